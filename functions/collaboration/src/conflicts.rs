//! Conflict prediction, the pure rules: two collaborators who are both *editing* (a writer's
//! role and `editing` mode — readers and reviewers show in presence but are never a party)
//! are about to collide when
//!
//! - their selections overlap (both non-empty, sharing at least one character): `high`,
//!   `overlapping_selection`;
//! - their paragraph spans share a paragraph (a cursor's span is its paragraph, a
//!   selection's the paragraphs it touches): `high`, `same_paragraph`;
//! - their spans are next to each other: `medium`, `adjacent_paragraph`;
//! - otherwise (two or more paragraphs apart) nothing.
//!
//! The rules are symmetric, and the first that holds wins. Which warnings go out, and how
//! often, is decided by the document task (`document::sessions`).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Medium,
    High,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }

    /// A rank for comparisons stored outside the process (Redis).
    pub fn rank(self) -> u8 {
        match self {
            Severity::Medium => 2,
            Severity::High => 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    SameParagraph,
    AdjacentParagraph,
    OverlappingSelection,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SameParagraph => "same_paragraph",
            Reason::AdjacentParagraph => "adjacent_paragraph",
            Reason::OverlappingSelection => "overlapping_selection",
        }
    }
}

/// Where one collaborator is, resolved against the current text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Selected range in UTF-16 offsets, `from <= to` (equal: a cursor).
    pub from: u32,
    pub to: u32,
    /// Paragraphs the cursor or selection touches, `first <= last`.
    pub first: u32,
    pub last: u32,
}

impl Span {
    pub fn cursor(offset: u32, paragraph: u32) -> Span {
        Span {
            from: offset,
            to: offset,
            first: paragraph,
            last: paragraph,
        }
    }
}

/// One side of a pair.
#[derive(Debug, Clone, Copy)]
pub struct Party<'a> {
    pub user: &'a str,
    /// A writer in `editing` mode.
    pub editing: bool,
    pub span: Span,
}

/// A predicted collision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prediction {
    pub severity: Severity,
    pub reason: Reason,
    /// The paragraph it is about: the shared one (the first shared), or for neighbours the
    /// upper of the two.
    pub paragraph: u32,
}

/// The prediction for two collaborators, if any.
pub fn predict(a: &Party<'_>, b: &Party<'_>) -> Option<Prediction> {
    if !a.editing || !b.editing || a.user == b.user {
        return None;
    }
    let (x, y) = (a.span, b.span);
    if x.from < x.to && y.from < y.to && x.from < y.to && y.from < x.to {
        return Some(Prediction {
            severity: Severity::High,
            reason: Reason::OverlappingSelection,
            paragraph: x.first.max(y.first),
        });
    }
    if x.first <= y.last && y.first <= x.last {
        return Some(Prediction {
            severity: Severity::High,
            reason: Reason::SameParagraph,
            paragraph: x.first.max(y.first),
        });
    }
    if x.last.checked_add(1) == Some(y.first) || y.last.checked_add(1) == Some(x.first) {
        return Some(Prediction {
            severity: Severity::Medium,
            reason: Reason::AdjacentParagraph,
            paragraph: x.last.min(y.last),
        });
    }
    None
}

/// What to tell `user` about `other`.
pub fn suggestion(p: &Prediction, other: &str) -> String {
    match p.reason {
        Reason::OverlappingSelection => format!(
            "{other} has selected text that overlaps yours in paragraph {}: agree who changes it before you edit",
            p.paragraph + 1
        ),
        Reason::SameParagraph => format!(
            "{other} is working in the same paragraph ({}): your edits may collide; consider another paragraph or coordinate",
            p.paragraph + 1
        ),
        Reason::AdjacentParagraph => format!(
            "{other} is working in the neighbouring paragraph: take care around paragraph {}",
            p.paragraph + 1
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(user: &str, offset: u32, paragraph: u32) -> Party<'_> {
        Party {
            user,
            editing: true,
            span: Span::cursor(offset, paragraph),
        }
    }

    #[test]
    fn the_rules() {
        let a = at("a", 10, 3);
        let same = predict(&a, &at("b", 40, 3)).unwrap();
        assert_eq!(
            (same.severity, same.reason),
            (Severity::High, Reason::SameParagraph)
        );
        let adj = predict(&a, &at("b", 60, 4)).unwrap();
        assert_eq!(
            (adj.severity, adj.reason, adj.paragraph),
            (Severity::Medium, Reason::AdjacentParagraph, 3)
        );
        assert_eq!(predict(&a, &at("b", 80, 5)), None, "two paragraphs apart");
        assert_eq!(predict(&a, &at("a", 10, 3)), None, "the same user");
        let mut reader = at("r", 10, 3);
        reader.editing = false;
        assert_eq!(predict(&a, &reader), None, "a reader is never a party");
        let sel = |user, from, to, first, last| Party {
            user,
            editing: true,
            span: Span {
                from,
                to,
                first,
                last,
            },
        };
        let o = predict(&sel("a", 0, 30, 0, 2), &sel("b", 20, 50, 2, 4)).unwrap();
        assert_eq!(
            (o.severity, o.reason),
            (Severity::High, Reason::OverlappingSelection)
        );
        // Touching selections do not overlap; they share paragraph 2.
        let t = predict(&sel("a", 0, 20, 0, 2), &sel("b", 20, 50, 2, 4)).unwrap();
        assert_eq!(t.reason, Reason::SameParagraph);
        // A selection spanning paragraphs 0..=2 against a cursor in 3: adjacent.
        let n = predict(&sel("a", 0, 20, 0, 2), &at("b", 30, 3)).unwrap();
        assert_eq!(n.reason, Reason::AdjacentParagraph);
    }

    #[test]
    fn symmetric_over_a_grid() {
        let spans: Vec<Span> = (0..6u32)
            .flat_map(|first| {
                (first..6).flat_map(move |last| {
                    [
                        (first * 10, last * 10 + 5),
                        (first * 10 + 3, first * 10 + 3),
                    ]
                    .into_iter()
                    .map(move |(from, to)| Span {
                        from,
                        to,
                        first,
                        last,
                    })
                })
            })
            .collect();
        for x in &spans {
            for y in &spans {
                let a = Party {
                    user: "a",
                    editing: true,
                    span: *x,
                };
                let b = Party {
                    user: "b",
                    editing: true,
                    span: *y,
                };
                let (p, q) = (predict(&a, &b), predict(&b, &a));
                assert_eq!(p, q, "{x:?} {y:?}");
                let gap = y
                    .first
                    .saturating_sub(x.last)
                    .max(x.first.saturating_sub(y.last));
                assert_eq!(p.is_none(), gap >= 2, "{x:?} {y:?}");
            }
        }
    }
}
