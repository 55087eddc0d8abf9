//! The decisions of a single-node listener's election, as pure functions of
//! the Lease as read, when this agent last saw it change, and the clock.
//!
//! Like client-go's leaderelection, expiry is judged on the reader's own
//! monotonic clock (the time it observed the record change), never by
//! comparing another process's timestamps, so clock skew cannot shorten a
//! lease. Unlike it, the holder's permission to listen is bounded on the
//! server side too: every enable carries `until` = the start of the last
//! successful renewal + the renew deadline, which is before the lease can
//! expire for anyone else, so a holder that freezes stops listening on its
//! own before another node may start.

use std::time::{Duration, Instant, SystemTime};

/// A listener's election timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    pub lease: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

impl Timings {
    pub fn from_seconds(lease: i32, renew_deadline: i32, retry: i32) -> Self {
        let s = |v: i32| Duration::from_secs(u64::try_from(v.max(1)).unwrap_or(1));
        Timings {
            lease: s(lease),
            renew_deadline: s(renew_deadline),
            retry: s(retry),
        }
    }
}

/// The parts of a Lease the election reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub transitions: i32,
    pub duration_seconds: i32,
    /// The renew time as the holder wrote it (compared for change only).
    pub renew_time: Option<String>,
}

impl Record {
    fn held_by(&self, me: &str) -> bool {
        self.holder.as_deref() == Some(me)
    }

    fn free(&self) -> bool {
        self.holder.as_deref().is_none_or(str::is_empty)
    }
}

/// What to do with the Lease now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// We hold it: write a new renew time.
    Renew,
    /// Free or expired: take it (transitions + 1).
    Acquire,
    /// Someone else holds a valid lease.
    Wait,
}

/// `observed_at` is when this agent first saw the record as it is now.
pub fn next(me: &str, record: &Record, observed_at: Instant, now: Instant) -> Next {
    if record.held_by(me) {
        return Next::Renew;
    }
    if record.free() {
        return Next::Acquire;
    }
    match expires_at(me, record, observed_at) {
        Some(at) if now < at => Next::Wait,
        _ => Next::Acquire,
    }
}

/// When another holder's lease, first seen as it is now at `observed_at`,
/// runs out on this reader's clock; None when it is free or this agent's.
pub fn expires_at(me: &str, record: &Record, observed_at: Instant) -> Option<Instant> {
    if record.held_by(me) || record.free() {
        return None;
    }
    let lease = Duration::from_secs(u64::try_from(record.duration_seconds.max(1)).unwrap_or(1));
    Some(observed_at + lease)
}

/// Whether a Lease seen on the watch is worth a turn now rather than at
/// the next retry: a free Lease, to a contender that does not hold it. A
/// holder releases only once its server confirmed the disable, so taking
/// a free Lease at once is as safe as taking it a retry period later.
pub fn take_on_sight(record: &Record, contending: bool, holding: bool) -> bool {
    contending && !holding && record.free()
}

/// Whether a holder whose last successful renewal started at `last_renew`
/// must stop listening: the renew deadline passed.
pub fn must_step_down(last_renew: Instant, now: Instant, timings: &Timings) -> bool {
    now.duration_since(last_renew) >= timings.renew_deadline
}

/// Until when a renewal that started at `renew_started` (wall clock)
/// allows listening.
pub fn listen_until(renew_started: SystemTime, timings: &Timings) -> SystemTime {
    renew_started + timings.renew_deadline
}

/// How a listener's disable ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disable {
    Confirmed,
    Unconfirmed,
}

/// What a holder that stepped down does with the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterStepDown {
    Release,
    LetExpire,
}

/// A holder that stopped listening releases the Lease (so the next node
/// starts within a retry period) only when its server confirmed the
/// disable. Otherwise the server may still listen, and the Lease is left
/// to run out: nobody takes it over before a whole lease duration after
/// the last renewal, by which time the server's `until` has passed.
pub fn after_step_down(disable: Disable) -> AfterStepDown {
    match disable {
        Disable::Confirmed => AfterStepDown::Release,
        Disable::Unconfirmed => AfterStepDown::LetExpire,
    }
}

/// The pause before another attempt at a failed disable, or None when the
/// `deadline` (the holder's renew deadline) has come: attempts go on until
/// then, and the last one starts at the deadline at the latest.
pub fn retry_disable(now: Instant, deadline: Instant, pause: Duration) -> Option<Duration> {
    let left = deadline
        .checked_duration_since(now)
        .filter(|d| !d.is_zero())?;
    Some(pause.min(left))
}

/// Milliseconds since the Unix epoch, as the hooks carry times.
pub fn unix_millis(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: &str) -> Record {
        Record {
            holder: Some(by.into()),
            transitions: 3,
            duration_seconds: 15,
            renew_time: Some("t".into()),
        }
    }

    #[test]
    fn the_holder_renews_and_a_free_lease_is_taken() {
        let now = Instant::now();
        assert_eq!(next("a", &held("a"), now, now), Next::Renew);
        assert_eq!(next("a", &Record::default(), now, now), Next::Acquire);
        let released = Record {
            holder: Some(String::new()),
            ..held("b")
        };
        assert_eq!(next("a", &released, now, now), Next::Acquire);
    }

    #[test]
    fn another_holders_lease_expires_on_the_readers_clock() {
        let seen = Instant::now();
        let later = |s| seen + Duration::from_secs(s);
        assert_eq!(next("a", &held("b"), seen, later(14)), Next::Wait);
        assert_eq!(next("a", &held("b"), seen, later(15)), Next::Acquire);
    }

    #[test]
    fn another_holders_lease_runs_out_a_lease_duration_after_it_was_seen() {
        let seen = Instant::now();
        assert_eq!(
            expires_at("a", &held("b"), seen),
            Some(seen + Duration::from_secs(15))
        );
        assert_eq!(expires_at("a", &held("a"), seen), None);
        assert_eq!(expires_at("a", &Record::default(), seen), None);
        // The turn at that instant takes it.
        assert_eq!(
            next("a", &held("b"), seen, seen + Duration::from_secs(15)),
            Next::Acquire
        );
    }

    #[test]
    fn only_a_free_lease_seen_by_a_contender_not_holding_it_is_taken_at_once() {
        let released = Record {
            holder: Some(String::new()),
            ..held("b")
        };
        assert!(take_on_sight(&released, true, false));
        assert!(take_on_sight(&Record::default(), true, false));
        // Held by another: its expiry, not the watch, decides.
        assert!(!take_on_sight(&held("b"), true, false));
        // The holder's own renewals wake nobody, nor does anything wake a
        // node that does not contend.
        assert!(!take_on_sight(&held("a"), true, true));
        assert!(!take_on_sight(&released, false, false));
        assert!(!take_on_sight(&released, true, true));
    }

    #[test]
    fn a_lease_is_released_only_when_the_server_confirmed_the_disable() {
        assert_eq!(after_step_down(Disable::Confirmed), AfterStepDown::Release);
        assert_eq!(
            after_step_down(Disable::Unconfirmed),
            AfterStepDown::LetExpire
        );
    }

    #[test]
    fn a_failed_disable_is_retried_until_the_renew_deadline_and_not_after() {
        let now = Instant::now();
        let pause = Duration::from_millis(250);
        let deadline = now + Duration::from_secs(4);
        assert_eq!(retry_disable(now, deadline, pause), Some(pause));
        // The last attempt starts at the deadline at the latest.
        let late = deadline - Duration::from_millis(100);
        assert_eq!(
            retry_disable(late, deadline, pause),
            Some(Duration::from_millis(100))
        );
        assert_eq!(retry_disable(deadline, deadline, pause), None);
        assert_eq!(retry_disable(deadline + pause, deadline, pause), None);
    }

    #[test]
    fn a_recreated_pod_does_not_renew_its_predecessors_lease() {
        let now = Instant::now();
        let old = crate::listeners::holder_identity("l-0", "8d1c");
        let new = crate::listeners::holder_identity("l-0", "f00d");
        assert_eq!(next(&new, &held(&old), now, now), Next::Wait);
        assert_eq!(next(&old, &held(&old), now, now), Next::Renew);
    }

    #[test]
    fn a_holder_steps_down_at_the_renew_deadline_before_the_lease_expires() {
        let t = Timings::from_seconds(15, 10, 2);
        let renewed = Instant::now();
        assert!(!must_step_down(
            renewed,
            renewed + Duration::from_secs(9),
            &t
        ));
        assert!(must_step_down(
            renewed,
            renewed + Duration::from_secs(10),
            &t
        ));
        // What a holder is allowed ends before anyone else may acquire.
        let wall = SystemTime::now();
        assert!(listen_until(wall, &t) < wall + t.lease);
    }
}
