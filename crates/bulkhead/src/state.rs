//! [`Compartment`]: one key's places, and the shared state of the layer.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use toolwarden_core::{Bounds, BulkheadFull, Event, Events, Key, KeyBy, KeyRef, KeyedState};

use crate::adaptive::{AdaptiveCap, Aimd};

/// The `retry_after` of a refusal before any call of the key has completed.
pub(crate) const UNMEASURED_RETRY_AFTER: Duration = Duration::from_millis(100);
/// The shortest `retry_after` a refusal carries.
pub(crate) const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);

/// The cap, the wait and the adaptive bounds of one key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Limits {
    pub(crate) max_concurrent: u32,
    pub(crate) max_wait: Duration,
    /// `None`: the cap is `max_concurrent`, fixed.
    pub(crate) adaptive: Option<Aimd>,
}

impl Limits {
    /// The cap a key starts with.
    pub(crate) fn initial_cap(&self) -> u32 {
        self.adaptive.map_or(self.max_concurrent, |a| a.initial)
    }
}

/// One key's places: a fair semaphore of permits (the cap), and the
/// recent duration of its calls (an EWMA), from which a refusal estimates
/// when a place comes free; with an adaptive cap, the cap's state.
pub(crate) struct Compartment {
    pub(crate) semaphore: Arc<Semaphore>,
    pub(crate) limits: Limits,
    /// EWMA of completed call durations, in nanoseconds; 0: none yet.
    ewma_nanos: AtomicU64,
    /// `None` (the default): the cap is fixed and the calls' end costs
    /// one `add_permits`, nothing more.
    pub(crate) adaptive: Option<AdaptiveCap>,
}

impl fmt::Debug for Compartment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compartment")
            .field("limits", &self.limits)
            .field("in_flight", &self.in_flight())
            .field("adaptive", &self.adaptive)
            .finish_non_exhaustive()
    }
}

impl Compartment {
    /// The compartment of the key named `key`; an adaptive cap tells
    /// `events` when it moves.
    pub(crate) fn new(limits: Limits, key: &dyn fmt::Display, events: &Events) -> Self {
        Compartment {
            semaphore: Arc::new(Semaphore::new(limits.initial_cap() as usize)),
            limits,
            ewma_nanos: AtomicU64::new(0),
            adaptive: limits
                .adaptive
                .map(|bounds| AdaptiveCap::new(bounds, Arc::from(key.to_string()), events.clone())),
        }
    }

    /// Takes a place if one is free now (never ahead of a waiting call:
    /// tokio's semaphore hands released permits to waiters first).
    #[inline]
    pub(crate) fn try_enter(&self) -> bool {
        match self.semaphore.try_acquire() {
            Ok(permit) => {
                // Given back by `leave`, when the call's `Permit` drops.
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Gives a place back (a fixed cap's; see [`Permit`](crate::future)
    /// for an adaptive one's).
    #[inline]
    pub(crate) fn leave(&self) {
        self.semaphore.add_permits(1);
    }

    /// The cap now: the fixed one, or where the adaptive one stands.
    #[inline]
    pub(crate) fn cap(&self) -> u32 {
        match &self.adaptive {
            None => self.limits.max_concurrent,
            Some(adaptive) => adaptive.cap(),
        }
    }

    /// Places taken now.
    pub(crate) fn in_flight(&self) -> u32 {
        if let Some(adaptive) = &self.adaptive {
            return adaptive.in_flight(&self.semaphore);
        }
        let free = u32::try_from(self.semaphore.available_permits()).unwrap_or(u32::MAX);
        self.limits.max_concurrent.saturating_sub(free)
    }

    /// Records the duration of a completed call (EWMA, weight 1/8 for the
    /// new sample, as TCP's smoothed round-trip time).
    #[inline]
    pub(crate) fn record(&self, duration: Duration) {
        let sample = u64::try_from(duration.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        // A lost race drops one sample: an estimate, not an account.
        let old = self.ewma_nanos.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.ewma_nanos.store(new.max(1), Ordering::Relaxed);
    }

    /// When a place is expected to come free: with every place taken by
    /// calls of the recent average duration `d`, one ends about every
    /// `d / cap`. At least 1 ms; 100 ms before any call ended.
    pub(crate) fn retry_after(&self) -> Duration {
        match self.ewma_nanos.load(Ordering::Relaxed) {
            0 => UNMEASURED_RETRY_AFTER,
            nanos => {
                Duration::from_nanos(nanos / u64::from(self.cap().max(1))).max(MIN_RETRY_AFTER)
            }
        }
    }

    /// The recent average call duration, if any call ended.
    pub(crate) fn average_duration(&self) -> Option<Duration> {
        match self.ewma_nanos.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }
}

/// The validated configuration and the per-key places, shared by every
/// service built from one layer.
pub(crate) struct Shared {
    pub(crate) state: KeyedState<Arc<Compartment>>,
    pub(crate) key_by: KeyBy,
    pub(crate) default: Limits,
    /// Per-tool limits, and the overflow compartment of each overridden
    /// tool (its keys past the bound share it, so the bound never lifts an
    /// override's cap).
    pub(crate) tools: Arc<HashMap<Arc<str>, Limits>>,
    pub(crate) tool_overflow: HashMap<Arc<str>, Arc<Compartment>>,
    pub(crate) bounds: Bounds,
    pub(crate) events: Events,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("key_by", &self.key_by)
            .field("default", &self.default)
            .field("tools", &self.tools)
            .field("keys", &self.state.len())
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

/// The tool a key names, when it names one.
fn key_tool(key: &Key) -> Option<&str> {
    match key {
        Key::Tool(tool) | Key::SessionTool(_, tool) => Some(tool),
        _ => None,
    }
}

fn key_ref_tool<'a>(key: &'a KeyRef<'_>) -> Option<&'a str> {
    match key {
        KeyRef::Tool(tool) | KeyRef::SessionTool(_, tool) => Some(tool),
        _ => None,
    }
}

impl Shared {
    pub(crate) fn new(
        key_by: KeyBy,
        default: Limits,
        tools: HashMap<Arc<str>, Limits>,
        bounds: Bounds,
        events: Events,
    ) -> Self {
        let tools = Arc::new(tools);
        let for_keys = Arc::clone(&tools);
        let key_events = events.clone();
        let state = KeyedState::new_keeping(
            bounds,
            move |key: &Key| {
                let limits = key_tool(key)
                    .and_then(|tool| for_keys.get(tool).copied())
                    .unwrap_or(default);
                Arc::new(Compartment::new(limits, key, &key_events))
            },
            // A key with calls in flight or waiting (each holds a clone) is
            // never evicted: a fresh compartment would forget their places.
            |compartment: &Arc<Compartment>| Arc::strong_count(compartment) > 1,
        );
        let tool_overflow = tools
            .iter()
            .map(|(tool, limits)| {
                let compartment = Compartment::new(*limits, tool, &events);
                (Arc::clone(tool), Arc::new(compartment))
            })
            .collect();
        Shared {
            state,
            key_by,
            default,
            tools,
            tool_overflow,
            bounds,
            events,
        }
    }

    /// The limits of `tool` (its override, else the default).
    pub(crate) fn limits_of(&self, tool: Option<&str>) -> Limits {
        tool.and_then(|tool| self.tools.get(tool).copied())
            .unwrap_or(self.default)
    }

    /// The cap of `key` now; a key not kept yet would start at its
    /// initial cap.
    pub(crate) fn current_limit(&self, key: KeyRef<'_>) -> u32 {
        self.state
            .with(&key, |c| c.cap())
            .unwrap_or_else(|| self.limits_of(key_ref_tool(&key)).initial_cap())
    }

    /// The compartment of `key`.
    #[inline]
    pub(crate) fn compartment(&self, key: KeyRef<'_>) -> Arc<Compartment> {
        if let Some(compartment) = self.state.with(&key, Arc::clone) {
            return compartment;
        }
        self.compartment_slow(key)
    }

    #[cold]
    fn compartment_slow(&self, key: KeyRef<'_>) -> Arc<Compartment> {
        let tool_overflow = key_ref_tool(&key).and_then(|tool| self.tool_overflow.get(tool));
        let tool_overflow = tool_overflow.map(Arc::clone);
        let entry = self.state.entry(key);
        match tool_overflow {
            Some(compartment) if entry.is_overflow() => compartment,
            _ => Arc::clone(&entry),
        }
    }

    /// The refusal of a call to `key`, reported as an event.
    #[cold]
    pub(crate) fn reject(
        &self,
        key: &str,
        subject: String,
        compartment: &Compartment,
    ) -> BulkheadFull {
        let retry_after = compartment.retry_after();
        // The cap the call found full (an adaptive one's, as it stands).
        let max_concurrent = compartment.cap();
        self.events.emit(&Event::BulkheadFull {
            key,
            max_concurrent,
            retry_after,
        });
        BulkheadFull::new(key, max_concurrent, retry_after).with_subject(subject)
    }
}
