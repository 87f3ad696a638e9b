//! Contribution and team analytics of one co-edited document, computed when asked from what
//! attribution and presence keep: per collaborator the characters and words added and
//! deleted, edits, active minutes and the share of the current text they wrote; for the team
//! words per hour and active collaborators per hour; predicted conflicts against the
//! collisions that still happened; and a collaboration efficiency score (0–100).
//!
//! Who wrote the current text is read from the document itself: every Yjs item carries the
//! client id that inserted it, and attribution stored which user wrote with which client
//! (`inkwire:coedit:{documentId}:clients`). Text whose client is unknown (written before
//! this existed, or an update whose flush was lost) counts as `unknown`.
//!
//! The score weighs three components, each from 0 to 1:
//! - **avoidance** (50 %): of the near misses — predicted conflicts plus collisions that
//!   happened without a warning — the share that did not end in a collision: `1 −
//!   collisions / (predicted + collisions without warning)`; 1 when there were none;
//! - **balance** (25 %): how evenly the current text is shared between the users who wrote
//!   it, the normalized Shannon entropy of their shares (1 for a single author: nobody to
//!   balance against);
//! - **retention** (25 %): the share of all characters added that are still in the text
//!   (low when much is rewritten or deleted again), capped at 1.
//!
//! `score = round(100 × (0.5 avoidance + 0.25 balance + 0.25 retention))`.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use yrs::types::text::{ChangeKind, YChange};
use yrs::{Any, Doc, Out, ReadTxn, Snapshot, Text, Transact};

use crate::attribution::Contribution;
use crate::positions::TEXT_ROOT;

/// UTF-16 units of the current text per Yjs client id that wrote them.
pub fn text_by_client(doc: &Doc) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    let text = {
        let txn = doc.transact();
        match txn.get_text(TEXT_ROOT) {
            Some(t) => t,
            None => return out,
        }
    };
    let mut txn = doc.transact_mut();
    let hi = txn.snapshot();
    let lo = Snapshot::default();
    // Against an empty snapshot every visible item is "added", with its id.
    for d in text.diff_range(&mut txn, Some(&hi), Some(&lo), YChange::identity) {
        let len = match &d.insert {
            Out::Any(Any::String(s)) => s.encode_utf16().count() as u64,
            _ => 1,
        };
        if let Some(YChange {
            kind: ChangeKind::Added,
            id,
        }) = d.ychange
        {
            *out.entry(id.client.get()).or_default() += len;
        }
    }
    out
}

/// Conflict counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConflictCounts {
    pub predicted: u64,
    pub collisions: u64,
    pub collisions_after_warning: u64,
}

/// The score's components and the score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Efficiency {
    pub avoidance: f64,
    pub balance: f64,
    pub retention: f64,
    pub score: u8,
}

pub fn efficiency(
    conflicts: ConflictCounts,
    text_by_user: &BTreeMap<String, u64>,
    characters_added: u64,
) -> Efficiency {
    let unwarned = conflicts
        .collisions
        .saturating_sub(conflicts.collisions_after_warning);
    let near = conflicts.predicted + unwarned;
    let avoidance = if near == 0 {
        1.0
    } else {
        (1.0 - conflicts.collisions as f64 / near as f64).clamp(0.0, 1.0)
    };
    let shares: Vec<u64> = text_by_user.values().copied().filter(|n| *n > 0).collect();
    let total: u64 = shares.iter().sum();
    let balance = if shares.len() <= 1 {
        1.0
    } else {
        let h: f64 = shares
            .iter()
            .map(|n| {
                let p = *n as f64 / total as f64;
                -p * p.ln()
            })
            .sum();
        (h / (shares.len() as f64).ln()).clamp(0.0, 1.0)
    };
    let retention = if characters_added == 0 {
        1.0
    } else {
        (total as f64 / characters_added as f64).min(1.0)
    };
    let score = (100.0 * (0.5 * avoidance + 0.25 * balance + 0.25 * retention)).round() as u8;
    Efficiency {
        avoidance,
        balance,
        retention,
        score,
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Everything the route answers, from its inputs.
pub struct Inputs {
    pub contributors: Vec<Contribution>,
    /// UTF-16 units of the current text per user (`unknown` for unknown clients).
    pub text_by_user: BTreeMap<String, u64>,
    /// Minutes in which anyone edited.
    pub team_minutes: u64,
    /// (unix hour, user) → active minutes; user `*` is the team.
    pub activity: BTreeMap<(i64, String), u64>,
    pub conflicts: ConflictCounts,
}

pub fn report(project: &str, document: &str, i: &Inputs) -> Value {
    let text_total: u64 = i.text_by_user.values().sum();
    let mut users: BTreeMap<String, Value> = BTreeMap::new();
    for c in &i.contributors {
        let in_text = i.text_by_user.get(&c.user_id).copied().unwrap_or(0);
        users.insert(
            c.user_id.clone(),
            json!({
                "userId": c.user_id,
                "charactersAdded": c.inserted,
                "charactersDeleted": c.deleted,
                "wordsAdded": c.words_added,
                "wordsDeleted": c.words_deleted,
                "edits": c.updates,
                "activeMinutes": c.active_minutes,
                "charactersInText": in_text,
                "shareOfText": if text_total == 0 { 0.0 } else { round3(in_text as f64 / text_total as f64) },
            }),
        );
    }
    let words_added: u64 = i.contributors.iter().map(|c| c.words_added).sum();
    let words_deleted: u64 = i.contributors.iter().map(|c| c.words_deleted).sum();
    let characters_added: u64 = i.contributors.iter().map(|c| c.inserted).sum();
    let words_per_hour = if i.team_minutes == 0 {
        0.0
    } else {
        round3(words_added.saturating_sub(words_deleted) as f64 * 60.0 / i.team_minutes as f64)
    };
    let mut hours: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
    for ((hour, user), minutes) in &i.activity {
        let h = hours.entry(*hour).or_default();
        if user == "*" {
            h.1 = *minutes;
        } else {
            h.0 += 1;
        }
    }
    let over_time: Vec<Value> = hours
        .into_iter()
        .map(|(hour, (collaborators, minutes))| {
            let at = time::OffsetDateTime::from_unix_timestamp(hour * 3600)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                });
            json!({"hour": at, "activeCollaborators": collaborators, "activeMinutes": minutes})
        })
        .collect();
    let known: BTreeMap<String, u64> = i
        .text_by_user
        .iter()
        .filter(|(u, _)| u.as_str() != "unknown")
        .map(|(u, n)| (u.clone(), *n))
        .collect();
    let e = efficiency(i.conflicts, &known, characters_added);
    json!({
        "projectId": project,
        "documentId": document,
        "collaborators": users.into_values().collect::<Vec<_>>(),
        "text": {
            "characters": text_total,
            "unattributedCharacters": i.text_by_user.get("unknown").copied().unwrap_or(0),
        },
        "team": {
            "collaborators": i.contributors.len(),
            "wordsAdded": words_added,
            "wordsDeleted": words_deleted,
            "activeMinutes": i.team_minutes,
            "wordsPerHour": words_per_hour,
            "activeCollaboratorsOverTime": over_time,
        },
        "conflicts": {
            "predicted": i.conflicts.predicted,
            "collisions": i.conflicts.collisions,
            "collisionsAfterWarning": i.conflicts.collisions_after_warning,
        },
        "efficiency": {
            "score": e.score,
            "avoidance": round3(e.avoidance),
            "balance": round3(e.balance),
            "retention": round3(e.retention),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::updates::decoder::Decode;

    fn users(v: &[(&str, u64)]) -> BTreeMap<String, u64> {
        v.iter().map(|(u, n)| (u.to_string(), *n)).collect()
    }

    #[test]
    fn the_score() {
        let none = ConflictCounts::default();
        // One author, nothing rewritten, no conflicts: 100.
        assert_eq!(efficiency(none, &users(&[("a", 100)]), 100).score, 100);
        // Two equal authors: balance 1.
        let e = efficiency(none, &users(&[("a", 50), ("b", 50)]), 100);
        assert!((e.balance - 1.0).abs() < 1e-9);
        // Half the text rewritten away: retention 0.5 → 87.5 → 88.
        assert_eq!(efficiency(none, &users(&[("a", 50)]), 100).score, 88);
        // 4 warnings, 1 collision after one of them: avoidance 0.75.
        let c = ConflictCounts {
            predicted: 4,
            collisions: 1,
            collisions_after_warning: 1,
        };
        let e = efficiency(c, &users(&[("a", 10)]), 10);
        assert!((e.avoidance - 0.75).abs() < 1e-9);
        assert_eq!(e.score, 88);
        // Collisions nobody predicted: avoidance 0.
        let c = ConflictCounts {
            predicted: 0,
            collisions: 3,
            collisions_after_warning: 0,
        };
        assert_eq!(efficiency(c, &users(&[("a", 10)]), 10).avoidance, 0.0);
        // Lopsided text: balance below 1.
        let e = efficiency(none, &users(&[("a", 90), ("b", 10)]), 100);
        assert!(e.balance > 0.4 && e.balance < 0.5, "{e:?}");
    }

    #[test]
    fn text_by_client_reads_who_wrote_what() {
        let a = Doc::with_client_id(1);
        let t = a.get_or_insert_text(TEXT_ROOT);
        t.insert(&mut a.transact_mut(), 0, "hello ");
        let b = Doc::with_client_id(2);
        let update = a
            .transact()
            .encode_state_as_update_v1(&yrs::StateVector::default());
        b.transact_mut()
            .apply_update(yrs::Update::decode_v1(&update).unwrap())
            .unwrap();
        let tb = b.get_or_insert_text(TEXT_ROOT);
        tb.insert(&mut b.transact_mut(), 6, "wörld😀");
        tb.remove_range(&mut b.transact_mut(), 0, 1);
        let by = text_by_client(&b);
        assert_eq!(by.get(&1), Some(&5));
        assert_eq!(by.get(&2), Some(&7));
    }
}
