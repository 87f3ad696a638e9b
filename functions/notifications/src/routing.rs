//! Priority routing — which channels a notification of each priority goes to, by default or
//! as configured in `INKWIRE_NOTIFY_ROUTING` — and the keys that group notifications: the
//! similarity key (auto-mute) and the digest key.
//!
//! Default table (the contract):
//!
//! | priority | channels |
//! | --- | --- |
//! | critical | in_app + email + sms + push (each where the recipient has an address) |
//! | high | in_app + email + push |
//! | medium | in_app + push |
//! | low | in_app + email in a digest |
//!
//! `INKWIRE_NOTIFY_ROUTING` overrides rows: `;`-separated `priority=channel+channel…`, where
//! `email@digest` means "email, but only inside a digest", e.g.
//! `high=in_app+email+push;medium=in_app+push;low=in_app+email@digest`. Priorities not named
//! keep their default row; spaces around names and a trailing `;` are allowed; unset or
//! blank means the default table. Refused, with a message naming the entry: an unknown
//! priority or channel, a priority or channel given twice, a row without `in_app` (every
//! notification is stored in the inbox), `@digest` on another channel than email (there are
//! no SMS or push digests), and `critical` with a digest (critical bypasses digests).
//!
//! Keys are also parts of Redis keys and job ids, so they are bounded and never contain `:`:
//! - similarity key `category/groupKey`, else `category/t:template`, else
//!   `category/h:hash(title)` (the contract); a group key or template that is not an
//!   identifier (`[A-Za-z0-9_.-]`, up to 64) is hashed too, as `category/g#…` or
//!   `category/t#…` (`#` is never in an identifier, so a hashed key cannot equal a plain one);
//! - digest key `category` or `category.groupKey` (`category.#hash` when the group key is not
//!   an identifier).
//!   The contract says "groupKey if given, else the category"; we keep the category in front
//!   so that the same group key used in two categories (which may have different digest
//!   schedules) never shares a digest — "two keys never share a digest".

use std::fmt;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::model::{DeliveryChannel, Priority};

/// The environment variable that overrides the routing table.
pub const ROUTING_ENV: &str = "INKWIRE_NOTIFY_ROUTING";

/// How a routed channel is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// Delivered on its own (subject to quiet hours, mute and the category's digest).
    Direct,
    /// Only inside a digest (the category's, or a daily 08:00 one when that is off).
    Digest,
}

/// Priority → channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingTable {
    /// `[priority][channel]`, in the order of `Priority::ALL` and `DeliveryChannel::ALL`.
    rows: [[Option<Route>; 4]; 4],
}

fn p_index(p: Priority) -> usize {
    Priority::ALL.iter().position(|x| *x == p).unwrap_or(0)
}

fn c_index(c: DeliveryChannel) -> usize {
    DeliveryChannel::ALL
        .iter()
        .position(|x| *x == c)
        .unwrap_or(0)
}

impl Default for RoutingTable {
    fn default() -> Self {
        use Route::{Digest, Direct};
        // Columns: in_app, email, sms, push.
        RoutingTable {
            rows: [
                [Some(Direct), Some(Direct), Some(Direct), Some(Direct)], // critical
                [Some(Direct), Some(Direct), None, Some(Direct)],         // high
                [Some(Direct), None, None, Some(Direct)],                 // medium
                [Some(Direct), Some(Digest), None, None],                 // low
            ],
        }
    }
}

/// Why `INKWIRE_NOTIFY_ROUTING` was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RoutingError {
    #[error(
        "{ROUTING_ENV}: entry {entry:?} is not priority=channel+channel… \
         (e.g. high=in_app+email+push)"
    )]
    Malformed { entry: String },
    #[error("{ROUTING_ENV}: unknown priority {name:?}: expected critical, high, medium or low")]
    UnknownPriority { name: String },
    #[error("{ROUTING_ENV}: priority {priority} is given twice")]
    DuplicatePriority { priority: &'static str },
    #[error(
        "{ROUTING_ENV}: {priority}: unknown channel {name:?}: expected in_app, email, sms or \
         push (email may be email@digest)"
    )]
    UnknownChannel {
        priority: &'static str,
        name: String,
    },
    #[error("{ROUTING_ENV}: {priority}: unknown modifier {name:?}: the only one is @digest")]
    UnknownModifier {
        priority: &'static str,
        name: String,
    },
    #[error("{ROUTING_ENV}: {priority}: channel {channel} is given twice")]
    DuplicateChannel {
        priority: &'static str,
        channel: &'static str,
    },
    #[error(
        "{ROUTING_ENV}: {priority}: in_app is missing (every notification is stored in the \
         inbox)"
    )]
    MissingInApp { priority: &'static str },
    #[error("{ROUTING_ENV}: {priority}: only email can go in a digest, not {channel}")]
    DigestNotEmail {
        priority: &'static str,
        channel: &'static str,
    },
    #[error("{ROUTING_ENV}: critical notifications are never digested")]
    CriticalDigest,
}

impl RoutingTable {
    /// How `channel` is used for `priority`, or `None` when it is not routed.
    pub fn route(&self, priority: Priority, channel: DeliveryChannel) -> Option<Route> {
        self.rows[p_index(priority)][c_index(channel)]
    }

    /// The routed channels of `priority`, in `DeliveryChannel::ALL` order.
    pub fn channels(&self, priority: Priority) -> Vec<(DeliveryChannel, Route)> {
        DeliveryChannel::ALL
            .into_iter()
            .filter_map(|c| self.route(priority, c).map(|r| (c, r)))
            .collect()
    }

    /// The table from `INKWIRE_NOTIFY_ROUTING` (the default when unset or blank).
    pub fn from_env() -> Result<RoutingTable, RoutingError> {
        match std::env::var(ROUTING_ENV) {
            Ok(spec) => RoutingTable::parse(&spec),
            Err(_) => Ok(RoutingTable::default()),
        }
    }

    /// The default table with the rows `spec` names replaced (module doc for the format).
    pub fn parse(spec: &str) -> Result<RoutingTable, RoutingError> {
        let mut table = RoutingTable::default();
        let mut seen = [false; 4];
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((name, channels)) = entry.split_once('=') else {
                return Err(RoutingError::Malformed {
                    entry: entry.to_string(),
                });
            };
            let name = name.trim();
            let priority = Priority::parse(name).ok_or_else(|| RoutingError::UnknownPriority {
                name: name.to_string(),
            })?;
            let p = priority.as_str();
            if std::mem::replace(&mut seen[p_index(priority)], true) {
                return Err(RoutingError::DuplicatePriority { priority: p });
            }
            let mut row = [None; 4];
            for token in channels.split('+').map(str::trim) {
                if token.is_empty() {
                    return Err(RoutingError::Malformed {
                        entry: entry.to_string(),
                    });
                }
                let (cname, route) = match token.split_once('@') {
                    None => (token, Route::Direct),
                    Some((c, "digest")) => (c.trim(), Route::Digest),
                    Some((_, m)) => {
                        return Err(RoutingError::UnknownModifier {
                            priority: p,
                            name: m.to_string(),
                        });
                    }
                };
                let channel =
                    DeliveryChannel::parse(cname).ok_or_else(|| RoutingError::UnknownChannel {
                        priority: p,
                        name: cname.to_string(),
                    })?;
                if route == Route::Digest {
                    if priority == Priority::Critical {
                        return Err(RoutingError::CriticalDigest);
                    }
                    if channel != DeliveryChannel::Email {
                        return Err(RoutingError::DigestNotEmail {
                            priority: p,
                            channel: channel.as_str(),
                        });
                    }
                }
                if row[c_index(channel)].replace(route).is_some() {
                    return Err(RoutingError::DuplicateChannel {
                        priority: p,
                        channel: channel.as_str(),
                    });
                }
            }
            if row[c_index(DeliveryChannel::InApp)].is_none() {
                return Err(RoutingError::MissingInApp { priority: p });
            }
            table.rows[p_index(priority)] = row;
        }
        Ok(table)
    }
}

/// The whole table in the `INKWIRE_NOTIFY_ROUTING` format (parses back to itself).
impl fmt::Display for RoutingTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<String> = Priority::ALL
            .into_iter()
            .map(|p| {
                let channels: Vec<String> = self
                    .channels(p)
                    .into_iter()
                    .map(|(c, r)| match r {
                        Route::Direct => c.as_str().to_string(),
                        Route::Digest => format!("{}@digest", c.as_str()),
                    })
                    .collect();
                format!("{}={}", p.as_str(), channels.join("+"))
            })
            .collect();
        f.write_str(&rows.join(";"))
    }
}

/// Longest group key or template name used as is inside a key.
const MAX_KEY_PART: usize = 64;

fn is_key_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_KEY_PART
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A stable short hash (the first 16 hex digits of SHA-256): the same in every process and
/// version, unlike `std`'s hasher.
pub fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Which notifications count as "similar" for auto-mute (module doc).
pub fn similarity_key(
    category: &str,
    group_key: Option<&str>,
    template: Option<&str>,
    title: &str,
) -> String {
    let part = |plain: &str, hashed: &str, s: &str| {
        if is_key_part(s) {
            format!("{category}/{plain}{s}")
        } else {
            format!("{category}/{hashed}{}", short_hash(s))
        }
    };
    match (group_key, template) {
        (Some(g), _) => part("", "g#", g),
        (None, Some(t)) => part("t:", "t#", t),
        (None, None) => format!("{category}/h:{}", short_hash(title)),
    }
}

/// Which digest an item goes to (module doc).
pub fn digest_key(category: &str, group_key: Option<&str>) -> String {
    match group_key {
        None => category.to_string(),
        Some(g) if is_key_part(g) => format!("{category}.{g}"),
        Some(g) => format!("{category}.#{}", short_hash(g)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeliveryChannel::*;
    use Priority::*;

    fn row(t: &RoutingTable, p: Priority) -> Vec<(DeliveryChannel, Route)> {
        t.channels(p)
    }

    #[test]
    fn the_default_table_is_the_contracts() {
        let t = RoutingTable::default();
        let d = Route::Direct;
        assert_eq!(
            row(&t, Critical),
            vec![(InApp, d), (Email, d), (Sms, d), (Push, d)]
        );
        assert_eq!(row(&t, High), vec![(InApp, d), (Email, d), (Push, d)]);
        assert_eq!(row(&t, Medium), vec![(InApp, d), (Push, d)]);
        assert_eq!(row(&t, Low), vec![(InApp, d), (Email, Route::Digest)]);
        assert_eq!(
            t.to_string(),
            "critical=in_app+email+sms+push;high=in_app+email+push;medium=in_app+push;\
             low=in_app+email@digest"
        );
        assert_eq!(RoutingTable::parse(&t.to_string()).unwrap(), t);
        assert_eq!(RoutingTable::parse("").unwrap(), t);
        assert_eq!(RoutingTable::parse("  ; ").unwrap(), t);
    }

    #[test]
    fn rows_are_overridden_one_by_one() {
        let t = RoutingTable::parse(" medium = in_app + email@digest + sms ; low=in_app;").unwrap();
        assert_eq!(
            row(&t, Medium),
            vec![
                (InApp, Route::Direct),
                (Email, Route::Digest),
                (Sms, Route::Direct)
            ]
        );
        assert_eq!(row(&t, Low), vec![(InApp, Route::Direct)]);
        assert_eq!(row(&t, High), row(&RoutingTable::default(), High));
        assert_eq!(RoutingTable::parse(&t.to_string()).unwrap(), t);
        let t = RoutingTable::parse("critical=in_app+sms").unwrap();
        assert_eq!(t.route(Critical, Email), None);
        assert_eq!(t.route(Critical, Sms), Some(Route::Direct));
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        use RoutingError::*;
        let cases: Vec<(&str, RoutingError)> = vec![
            (
                "high",
                Malformed {
                    entry: "high".into(),
                },
            ),
            (
                "high=",
                Malformed {
                    entry: "high=".into(),
                },
            ),
            (
                "high=in_app++push",
                Malformed {
                    entry: "high=in_app++push".into(),
                },
            ),
            (
                "urgent=in_app",
                UnknownPriority {
                    name: "urgent".into(),
                },
            ),
            (
                "high=in_app;high=in_app",
                DuplicatePriority { priority: "high" },
            ),
            (
                "high=in_app+fax",
                UnknownChannel {
                    priority: "high",
                    name: "fax".into(),
                },
            ),
            (
                "high=in_app+email@weekly",
                UnknownModifier {
                    priority: "high",
                    name: "weekly".into(),
                },
            ),
            (
                "low=in_app+push+push",
                DuplicateChannel {
                    priority: "low",
                    channel: "push",
                },
            ),
            (
                "low=in_app+email+email@digest",
                DuplicateChannel {
                    priority: "low",
                    channel: "email",
                },
            ),
            ("medium=push", MissingInApp { priority: "medium" }),
            (
                "low=in_app+sms@digest",
                DigestNotEmail {
                    priority: "low",
                    channel: "sms",
                },
            ),
            (
                "low=in_app@digest",
                DigestNotEmail {
                    priority: "low",
                    channel: "in_app",
                },
            ),
            ("critical=in_app+email@digest", CriticalDigest),
        ];
        for (spec, want) in cases {
            let got = RoutingTable::parse(spec).unwrap_err();
            assert_eq!(got, want, "{spec}");
            assert!(
                got.to_string().starts_with("INKWIRE_NOTIFY_ROUTING: "),
                "{got}"
            );
        }
        let msg = RoutingTable::parse("high=in_app+fax")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("\"fax\"") && msg.contains("in_app, email, sms or push"),
            "{msg}"
        );
    }

    #[test]
    fn from_env_reads_the_variable() {
        // The only test that touches this variable (tests run in threads of one process).
        // SAFETY: no other test reads or writes INKWIRE_NOTIFY_ROUTING.
        unsafe { std::env::remove_var(ROUTING_ENV) };
        assert_eq!(RoutingTable::from_env().unwrap(), RoutingTable::default());
        unsafe { std::env::set_var(ROUTING_ENV, "medium=in_app") };
        assert_eq!(
            RoutingTable::from_env().unwrap().channels(Medium),
            vec![(InApp, Route::Direct)]
        );
        unsafe { std::env::set_var(ROUTING_ENV, "medium=push") };
        assert_eq!(
            RoutingTable::from_env().unwrap_err(),
            RoutingError::MissingInApp { priority: "medium" }
        );
        unsafe { std::env::remove_var(ROUTING_ENV) };
    }

    #[test]
    fn similarity_keys() {
        assert_eq!(
            similarity_key("collaboration", Some("doc-7"), Some("comment"), "t"),
            "collaboration/doc-7"
        );
        assert_eq!(
            similarity_key("chat", None, Some("mention"), "t"),
            "chat/t:mention"
        );
        let by_title = similarity_key("chat", None, None, "3 new messages");
        assert_eq!(by_title, format!("chat/h:{}", short_hash("3 new messages")));
        assert_eq!(by_title.len(), "chat/h:".len() + 16);
        assert_ne!(
            by_title,
            similarity_key("chat", None, None, "4 new messages")
        );
        // Same group key, other category: not similar.
        assert_ne!(
            similarity_key("chat", Some("k"), None, "t"),
            similarity_key("system", Some("k"), None, "t")
        );
        // A group key that is no identifier is hashed, and cannot collide with a template.
        let odd = similarity_key("chat", Some("a:b c"), None, "t");
        assert_eq!(odd, format!("chat/g#{}", short_hash("a:b c")));
        let keys = [
            similarity_key("chat", Some("a b"), None, "t"),
            similarity_key("chat", None, Some("a b"), "t"),
            similarity_key("chat", None, None, "a b"),
        ];
        assert!(
            keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2],
            "{keys:?}"
        );
        let long = "x".repeat(500);
        assert!(similarity_key("chat", Some(&long), None, "t").len() < 40);
    }

    #[test]
    fn digest_keys_never_merge() {
        assert_eq!(digest_key("publishing", None), "publishing");
        assert_eq!(
            digest_key("publishing", Some("book-1")),
            "publishing.book-1"
        );
        assert_ne!(
            digest_key("chat", Some("x")),
            digest_key("system", Some("x"))
        );
        assert_ne!(digest_key("chat", Some("x")), digest_key("chat", Some("y")));
        assert_ne!(digest_key("chat", Some("x")), digest_key("chat", None));
        let odd = digest_key("chat", Some("room:1/2"));
        assert_eq!(odd, format!("chat.#{}", short_hash("room:1/2")));
        assert!(!odd.contains(':') && !odd.contains('/'), "{odd}");
        assert_ne!(odd, digest_key("chat", Some("room:1/3")));
    }

    #[test]
    fn short_hash_is_stable() {
        // SHA-256("abc") starts ba7816bf8f01cfea.
        assert_eq!(short_hash("abc"), "ba7816bf8f01cfea");
    }
}
