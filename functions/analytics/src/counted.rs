//! What one stored event counts for (pure, unit-tested): its type, its project, the words
//! of a tracker's `writing.word_added`, the units and revenue of a `publishing.sales_updated`.
//!
//! Every id that becomes part of a Redis key or hash field is checked here first; an event
//! that fails a check (not an envelope, an unknown type, a bad project or book id, a words or
//! units figure out of range) counts nowhere. The events API never stores such an event, so
//! this only guards against messages put on the streams by other means.

use inkwire_shared::events::Category;
use inkwire_shared::membership::is_valid_id;
use serde::Deserialize;
use serde_json::Value;

/// A sale of a book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sale {
    pub book: String,
    pub units: i64,
    /// Hundredths of `revenue` (as sent, whatever the currency), 0 when absent.
    pub revenue_cents: i64,
}

/// What an event counts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    pub event_type: String,
    pub project: Option<String>,
    /// Words written (`writing.word_added`'s `data.words`), else 0.
    pub words: i64,
    pub sale: Option<Sale>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    category: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    data: Value,
}

/// Reads a stored event; `Err` says why it counts nowhere.
pub fn read(payload: &[u8]) -> Result<Counted, String> {
    let e: Envelope =
        serde_json::from_slice(payload).map_err(|e| format!("not an event envelope: {e}"))?;
    let category: Category = e.category.parse().map_err(|e| format!("{e}"))?;
    if !category.has_type(&e.event_type) {
        return Err(format!("{:?} is not a {category} event type", e.event_type));
    }
    if let Some(p) = &e.project_id
        && !is_valid_id(p)
    {
        return Err("projectId is not an identifier".into());
    }
    let mut counted = Counted {
        event_type: e.event_type,
        project: e.project_id,
        words: 0,
        sale: None,
    };
    match (category, counted.event_type.as_str()) {
        (Category::Writing, "word_added") => {
            counted.words = e.data["words"]
                .as_i64()
                .filter(|w| (0..=200_000).contains(w))
                .ok_or("word_added without a words count from 0 to 200000")?;
        }
        (Category::Publishing, "sales_updated") => {
            let book = e.data["bookId"]
                .as_str()
                .filter(|b| is_valid_id(b))
                .ok_or("sales_updated without a valid bookId")?;
            let units = e.data["units"]
                .as_i64()
                .filter(|u| (0..=u32::MAX as i64).contains(u))
                .ok_or("sales_updated without units from 0 to 4294967295")?;
            let revenue_cents = match &e.data["revenue"] {
                Value::Null => 0,
                v => v
                    .as_f64()
                    .filter(|r| r.is_finite() && (0.0..1e13).contains(r))
                    .map(|r| (r * 100.0).round() as i64)
                    .ok_or("sales_updated with a revenue that is not a number from 0")?,
            };
            counted.sale = Some(Sale {
                book: book.to_string(),
                units,
                revenue_cents,
            });
        }
        _ => {}
    }
    Ok(counted)
}

/// Every event type, for the per-type fields the API reads.
pub fn all_types() -> Vec<&'static str> {
    Category::ALL
        .iter()
        .flat_map(|c| c.event_types().iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bytes(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn reads_types_projects_words_and_sales() {
        let c = read(&bytes(json!({"category": "writing", "type": "word_added",
            "projectId": "p-1", "data": {"sessionId": "s", "words": 7}})))
        .unwrap();
        assert_eq!(c.words, 7);
        assert_eq!(c.project.as_deref(), Some("p-1"));
        let c = read(&bytes(
            json!({"category": "publishing", "type": "sales_updated",
            "data": {"bookId": "b-1", "platform": "kdp", "units": 3, "revenue": 12.345}}),
        ))
        .unwrap();
        assert_eq!(
            c.sale,
            Some(Sale {
                book: "b-1".into(),
                units: 3,
                revenue_cents: 1235
            })
        );
        assert_eq!(c.project, None);
    }

    #[test]
    fn bad_ids_and_figures_count_nowhere() {
        for bad in [
            json!({"category": "writing", "type": "word_added", "projectId": "p:1",
                "data": {"words": 1}}),
            json!({"category": "writing", "type": "sales_updated", "data": {}}),
            json!({"category": "poetry", "type": "word_added", "data": {}}),
            json!({"category": "writing", "type": "word_added", "data": {"words": -1}}),
            json!({"category": "publishing", "type": "sales_updated",
                "data": {"bookId": "b 1", "units": 1}}),
            json!({"category": "publishing", "type": "sales_updated",
                "data": {"bookId": "b1", "units": 1, "revenue": "x"}}),
        ] {
            assert!(read(&bytes(bad.clone())).is_err(), "{bad}");
        }
        assert!(read(b"not json").is_err());
    }
}
