//! One clock reading per call.
//!
//! Several layers read the clock when a call comes in: the loop guard for
//! its window, the retry layer for its deadline, the rate limiter for its
//! quotas, the circuit breaker for slow calls, the attempt timeout for its
//! deadline. A reading costs as much as a small layer's whole decision, and
//! the layers' `call`s run one inside the other, synchronously: the first
//! layer to [`hold`](CallInstant::hold) a reading lends it to every layer
//! below it until its `call` returns, and all of them judge the call at the
//! same instant.
//!
//! The readings are [`tokio::time::Instant`]s, so they follow a paused test
//! clock. Outside a hold, [`now`] reads the clock.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! use toolwarden_core::time::{now, CallInstant};
//! let held = CallInstant::hold();
//! let at = now();
//! assert_eq!(now(), at); // the held reading, not a new one
//! drop(held);
//! # }
//! ```

use std::cell::Cell;
use std::marker::PhantomData;

use tokio::time::Instant;

thread_local! {
    /// The reading lent to the calls below the outermost hold on this thread.
    static CALL_NOW: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The held reading, or the clock's when none is held.
#[inline]
#[must_use]
pub fn now() -> Instant {
    CALL_NOW.with(Cell::get).unwrap_or_else(Instant::now)
}

/// Lends one clock reading to [`now`] on this thread until dropped.
///
/// Hold it across a layer's synchronous `call` only, never across an
/// `.await` (it is `!Send`, so a `Send` future cannot keep it). Holds
/// nest: an inner hold keeps the outer reading.
#[derive(Debug)]
#[must_use = "the reading is lent only while the hold lives"]
pub struct CallInstant {
    outer: Option<Instant>,
    not_send: PhantomData<*const ()>,
}

impl CallInstant {
    /// Reads the clock, unless an outer hold already lends a reading.
    #[inline]
    pub fn hold() -> Self {
        let outer = CALL_NOW.with(Cell::get);
        if outer.is_none() {
            CALL_NOW.with(|now| now.set(Some(Instant::now())));
        }
        CallInstant {
            outer,
            not_send: PhantomData,
        }
    }
}

impl Drop for CallInstant {
    #[inline]
    fn drop(&mut self) {
        let outer = self.outer;
        CALL_NOW.with(|now| now.set(outer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_held_reading_is_lent_until_dropped_and_holds_nest() {
        let outer = CallInstant::hold();
        let at = now();
        tokio::time::advance(Duration::from_secs(1)).await;
        {
            let _inner = CallInstant::hold();
            assert_eq!(now(), at, "an inner hold keeps the outer reading");
        }
        assert_eq!(now(), at, "dropping the inner hold leaves the outer one");
        drop(outer);
        assert_eq!(now(), Instant::now());
        assert_eq!(now() - at, Duration::from_secs(1));
    }

    #[test]
    fn a_hold_lends_its_reading_to_its_own_thread_only() {
        let _held = CallInstant::hold();
        assert!(CALL_NOW.with(Cell::get).is_some());
        let lent_elsewhere = std::thread::spawn(|| CALL_NOW.with(Cell::get).is_some())
            .join()
            .unwrap();
        assert!(!lent_elsewhere);
    }
}
