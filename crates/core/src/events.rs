//! The event hook through which layers report resilience events.
//!
//! Layers emit [`Event`]s into an [`Events`] handle they were configured with;
//! observability and the Redis sync subscribe by adding an [`EventSink`].
//! Events borrow their data, so emitting one allocates nothing; with no sink
//! installed, emitting is a branch on an empty slice.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use toolwarden_core::events::{Event, Events};
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let sink = Arc::clone(&seen);
//! let events = Events::new().with(move |e: &Event<'_>| sink.lock().unwrap().push(e.name()));
//! events.emit(&Event::CircuitOpened { key: "search", retry_after: std::time::Duration::from_secs(5) });
//! assert_eq!(*seen.lock().unwrap(), ["circuit_opened"]);
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// One resilience event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A circuit opened (or reopened from half-open).
    CircuitOpened {
        /// The breaker key.
        key: &'a str,
        /// How long it stays open before a probe.
        retry_after: Duration,
    },
    /// A circuit let its first probe through.
    CircuitHalfOpen {
        /// The breaker key.
        key: &'a str,
    },
    /// A circuit closed.
    CircuitClosed {
        /// The breaker key.
        key: &'a str,
    },
    /// A call was refused (or delayed past `max_wait`) by a rate limit.
    RateLimited {
        /// The limiter key.
        key: &'a str,
        /// When a token is available.
        retry_after: Duration,
    },
    /// A failed call is retried.
    Retry {
        /// The tool or method.
        tool: &'a str,
        /// The attempt about to be made (2 for the first retry).
        attempt: u32,
        /// The backoff before it.
        delay: Duration,
    },
    /// A retry was refused because the retry budget is spent.
    BudgetExhausted {
        /// The tool or method.
        tool: &'a str,
    },
    /// A call repeated often enough to be close to blocking.
    LoopWarned {
        /// The tool.
        tool: &'a str,
        /// Repeats seen so far.
        repeats: u32,
    },
    /// A repeated call was blocked.
    LoopBlocked {
        /// The tool.
        tool: &'a str,
        /// Repeats seen, this one included.
        repeats: u32,
    },
    /// A stale cached result was served for a failed call.
    StaleServed {
        /// The tool.
        tool: &'a str,
        /// The age of the result served.
        age: Duration,
    },
    /// A failed call was answered with a structured error result.
    Degraded {
        /// The tool.
        tool: &'a str,
    },
    /// Shared state could not be synchronised with another replica.
    SyncError {
        /// What failed.
        detail: &'a str,
    },
}

impl Event<'_> {
    /// The event's name, used as the `event` metric label.
    pub fn name(&self) -> &'static str {
        match self {
            Event::CircuitOpened { .. } => "circuit_opened",
            Event::CircuitHalfOpen { .. } => "circuit_half_open",
            Event::CircuitClosed { .. } => "circuit_closed",
            Event::RateLimited { .. } => "rate_limited",
            Event::Retry { .. } => "retry",
            Event::BudgetExhausted { .. } => "budget_exhausted",
            Event::LoopWarned { .. } => "loop_warned",
            Event::LoopBlocked { .. } => "loop_blocked",
            Event::StaleServed { .. } => "stale_served",
            Event::Degraded { .. } => "degraded",
            Event::SyncError { .. } => "sync_error",
        }
    }

    /// The tool or key the event is about, if any.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Event::CircuitOpened { key, .. }
            | Event::CircuitHalfOpen { key }
            | Event::CircuitClosed { key }
            | Event::RateLimited { key, .. } => Some(key),
            Event::Retry { tool, .. }
            | Event::BudgetExhausted { tool }
            | Event::LoopWarned { tool, .. }
            | Event::LoopBlocked { tool, .. }
            | Event::StaleServed { tool, .. }
            | Event::Degraded { tool } => Some(tool),
            Event::SyncError { .. } => None,
        }
    }
}

/// Receives events. Implemented for closures `Fn(&Event<'_>)`.
pub trait EventSink: Send + Sync + 'static {
    /// Called synchronously on the call path: keep it cheap.
    fn on_event(&self, event: &Event<'_>);
}

impl<F> EventSink for F
where
    F: Fn(&Event<'_>) + Send + Sync + 'static,
{
    fn on_event(&self, event: &Event<'_>) {
        self(event)
    }
}

/// A cloneable set of sinks that layers emit into. Empty by default.
#[derive(Clone, Default)]
pub struct Events {
    sinks: Arc<[Arc<dyn EventSink>]>,
}

impl Events {
    /// No sinks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a sink.
    pub fn with(self, sink: impl EventSink) -> Self {
        self.with_arc(Arc::new(sink))
    }

    /// Adds a shared sink.
    pub fn with_arc(self, sink: Arc<dyn EventSink>) -> Self {
        let mut sinks: Vec<_> = self.sinks.iter().cloned().collect();
        sinks.push(sink);
        Events {
            sinks: sinks.into(),
        }
    }

    /// Merges two sets of sinks.
    pub fn merge(&self, other: &Events) -> Self {
        let sinks: Vec<_> = self
            .sinks
            .iter()
            .chain(other.sinks.iter())
            .cloned()
            .collect();
        Events {
            sinks: sinks.into(),
        }
    }

    /// Whether any sink is installed.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// Delivers `event` to every sink.
    #[inline]
    pub fn emit(&self, event: &Event<'_>) {
        for sink in self.sinks.iter() {
            sink.on_event(event);
        }
    }
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("sinks", &self.sinks.len())
            .finish()
    }
}
