//! A threshold's rule: when a metric's value over a window has crossed it, and when it is
//! back. Pure, so that the crossing logic is tested without servers; the worker keeps the
//! state in Redis and turns transitions into events.
//!
//! A threshold fires once when the value crosses it (`gt`: above the value, `lt`: below,
//! `gte` / `lte` including it) and stays fired while the value stays on that side — one
//! `analytics.threshold_crossed`, not one per bucket. It resolves once the value is back
//! past the threshold by at least the hysteresis (`gt 100, hysteresis 10`: fired at 101,
//! resolved at 90 or less), so a value wobbling around the threshold does not fire and
//! resolve every bucket.

use serde::{Deserialize, Serialize};

/// How the value is compared with the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Comparator {
    Gt,
    Gte,
    Lt,
    Lte,
}

impl Comparator {
    /// The event's `direction`: the side of the threshold a crossing is on.
    pub fn direction(self) -> &'static str {
        match self {
            Comparator::Gt | Comparator::Gte => "above",
            Comparator::Lt | Comparator::Lte => "below",
        }
    }

    /// Whether `value` is on the firing side of `threshold`.
    pub fn crossed(self, value: f64, threshold: f64) -> bool {
        match self {
            Comparator::Gt => value > threshold,
            Comparator::Gte => value >= threshold,
            Comparator::Lt => value < threshold,
            Comparator::Lte => value <= threshold,
        }
    }

    /// Whether `value` is back past `threshold` by at least `hysteresis`.
    pub fn back(self, value: f64, threshold: f64, hysteresis: f64) -> bool {
        match self {
            Comparator::Gt => value <= threshold - hysteresis,
            Comparator::Gte => value < threshold - hysteresis,
            Comparator::Lt => value >= threshold + hysteresis,
            Comparator::Lte => value > threshold + hysteresis,
        }
    }
}

/// What one evaluation does to a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing to say: armed and not crossed, or fired and not back.
    None,
    /// It was armed and the value crossed it.
    Crossed,
    /// It was fired and the value is back.
    Resolved,
}

/// The transition of a threshold that is `fired` (or armed) when the value is `value`.
pub fn transition(
    fired: bool,
    comparator: Comparator,
    threshold: f64,
    hysteresis: f64,
    value: f64,
) -> Transition {
    if !value.is_finite() {
        return Transition::None;
    }
    match fired {
        false if comparator.crossed(value, threshold) => Transition::Crossed,
        true if comparator.back(value, threshold, hysteresis) => Transition::Resolved,
        _ => Transition::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a series through the rule and lists the transitions with their index.
    fn run(
        c: Comparator,
        threshold: f64,
        hysteresis: f64,
        values: &[f64],
    ) -> Vec<(usize, Transition)> {
        let mut fired = false;
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let t = transition(fired, c, threshold, hysteresis, *v);
            match t {
                Transition::Crossed => fired = true,
                Transition::Resolved => fired = false,
                Transition::None => continue,
            }
            out.push((i, t));
        }
        out
    }

    #[test]
    fn fires_once_per_crossing_and_resolves_once() {
        let values = [50.0, 101.0, 150.0, 120.0, 95.0, 105.0, 90.0, 80.0, 130.0];
        assert_eq!(
            run(Comparator::Gt, 100.0, 10.0, &values),
            vec![
                (1, Transition::Crossed),
                (6, Transition::Resolved),
                (8, Transition::Crossed)
            ]
        );
        // Without hysteresis, 95 resolves and 105 fires again.
        assert_eq!(
            run(Comparator::Gt, 100.0, 0.0, &values),
            vec![
                (1, Transition::Crossed),
                (4, Transition::Resolved),
                (5, Transition::Crossed),
                (6, Transition::Resolved),
                (8, Transition::Crossed)
            ]
        );
    }

    #[test]
    fn comparators_and_their_edges() {
        assert!(!Comparator::Gt.crossed(100.0, 100.0));
        assert!(Comparator::Gte.crossed(100.0, 100.0));
        assert!(Comparator::Lt.crossed(9.0, 10.0));
        assert!(Comparator::Lte.crossed(10.0, 10.0));
        assert!(Comparator::Gt.back(90.0, 100.0, 10.0));
        assert!(!Comparator::Gte.back(90.0, 100.0, 10.0));
        assert!(Comparator::Lt.back(15.0, 10.0, 5.0));
        assert!(!Comparator::Lte.back(15.0, 10.0, 5.0));
        // A quiet metric falling under a `lt` threshold fires; climbing back resolves.
        assert_eq!(
            run(Comparator::Lt, 10.0, 2.0, &[20.0, 9.0, 0.0, 11.0, 12.0]),
            vec![(1, Transition::Crossed), (4, Transition::Resolved)]
        );
        assert_eq!(Comparator::Lte.direction(), "below");
        assert_eq!(
            transition(false, Comparator::Gt, 1.0, 0.0, f64::NAN),
            Transition::None
        );
    }
}
