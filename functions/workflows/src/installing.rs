//! Installing a built-in template ([`crate::templates`]) into a project: the template's
//! placeholders are replaced with the project's values, and the result is registered like
//! any definition (checked in full, immutable, versioned).
//!
//! Placeholders (written in the templates as the values they stand for, so that a template
//! reads like a real workflow): `"projectId": "template"` → the project; the base URL
//! `http://127.0.0.1:8080` → inkwire's own URL (`INKWIRE_WORKFLOW_SELF_URL`); the time zone
//! `Europe/Paris` of cron triggers → `timeZone` (default `UTC`); `https://store.example.com`
//! → `storeUrl` (the publication pipeline's store); `owner@example.com` → `email` (the weekly
//! digest's recipient).

use serde_json::{Map, Value, json};

/// What a template needs besides the project, by template name.
pub fn parameters(name: &str) -> &'static [&'static str] {
    match name {
        "book-publication-pipeline" => &["storeUrl"],
        "weekly-analytics-digest" => &["email", "timeZone"],
        "daily-writing-goal-reminder" => &["timeZone"],
        _ => &[],
    }
}

const SELF_PLACEHOLDER: &str = "http://127.0.0.1:8080";
const STORE_PLACEHOLDER: &str = "https://store.example.com";
const EMAIL_PLACEHOLDER: &str = "owner@example.com";
const ZONE_PLACEHOLDER: &str = "Europe/Paris";

/// Why a template could not be made into a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallError {
    pub field: &'static str,
    pub message: String,
}

/// The values an installation gives.
#[derive(Debug, Clone, Default)]
pub struct InstallParams {
    pub project: String,
    pub id: Option<String>,
    pub version: u32,
    pub self_url: Option<String>,
    pub store_url: Option<String>,
    pub email: Option<String>,
    pub time_zone: Option<String>,
}

fn replace_strings(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::String(s) if s.contains(from) => *s = s.replace(from, to),
        Value::Array(a) => a.iter_mut().for_each(|x| replace_strings(x, from, to)),
        Value::Object(o) => o.values_mut().for_each(|x| replace_strings(x, from, to)),
        _ => {}
    }
}

/// The definition JSON of template `name` for `params` (checked by the caller with
/// [`crate::parse_definition`]).
pub fn instantiate(name: &str, params: &InstallParams) -> Result<Value, InstallError> {
    let Some((_, text)) = crate::templates().into_iter().find(|(n, _)| *n == name) else {
        return Err(InstallError {
            field: "name",
            message: format!("no template {name:?}"),
        });
    };
    let mut def: Value = serde_json::from_str(text).expect("built-in templates are JSON");
    let id = match &params.id {
        Some(id) => id.clone(),
        None => {
            let id = format!("{}-{name}", params.project);
            if id.len() > 64 {
                return Err(InstallError {
                    field: "id",
                    message: format!("{id:?} is longer than 64 characters: give an id"),
                });
            }
            id
        }
    };
    def["id"] = json!(id);
    def["version"] = json!(params.version);
    def["projectId"] = json!(params.project);
    if text.contains(SELF_PLACEHOLDER) {
        let Some(url) = &params.self_url else {
            return Err(InstallError {
                field: "selfUrl",
                message: "the engine does not know inkwire's URL (INKWIRE_WORKFLOW_SELF_URL)"
                    .into(),
            });
        };
        replace_strings(&mut def, SELF_PLACEHOLDER, url);
    }
    for (placeholder, value, field) in [
        (STORE_PLACEHOLDER, &params.store_url, "storeUrl"),
        (EMAIL_PLACEHOLDER, &params.email, "email"),
    ] {
        if text.contains(placeholder) {
            let Some(value) = value else {
                return Err(InstallError {
                    field,
                    message: format!("{field} is required by the template {name}"),
                });
            };
            replace_strings(&mut def, placeholder, value.trim_end_matches('/'));
        }
    }
    if let Some(triggers) = def["triggers"].as_array_mut() {
        for t in triggers {
            if t["type"] == "cron" {
                t["timeZone"] = json!(params.time_zone.as_deref().unwrap_or("UTC"));
            }
        }
    }
    replace_strings(
        &mut def,
        ZONE_PLACEHOLDER,
        params.time_zone.as_deref().unwrap_or("UTC"),
    );
    Ok(def)
}

/// The templates as the API lists them.
pub fn catalogue() -> Vec<Value> {
    crate::templates()
        .into_iter()
        .map(|(name, text)| {
            let def: Map<String, Value> = serde_json::from_str(text).expect("templates are JSON");
            json!({
                "name": name,
                "title": def.get("name"),
                "description": def.get("description"),
                "triggers": def.get("triggers"),
                "parameters": parameters(name),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> InstallParams {
        InstallParams {
            project: "p-1".into(),
            version: 1,
            self_url: Some("http://inkwire.internal:8080".into()),
            store_url: Some("http://store.local/".into()),
            email: Some("me@example.org".into()),
            time_zone: Some("America/New_York".into()),
            ..Default::default()
        }
    }

    #[test]
    fn every_template_installs_as_a_valid_definition() {
        for (name, _) in crate::templates() {
            let def = instantiate(name, &params()).unwrap();
            let text = def.to_string();
            for placeholder in [
                SELF_PLACEHOLDER,
                STORE_PLACEHOLDER,
                EMAIL_PLACEHOLDER,
                ZONE_PLACEHOLDER,
                "\"template\"",
            ] {
                assert!(!text.contains(placeholder), "{name}: {placeholder} left");
            }
            let parsed = crate::parse_definition(&def).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(
                (parsed.id.as_str(), parsed.project_id.as_str()),
                (format!("p-1-{name}").as_str(), "p-1")
            );
        }
        let digest = instantiate("weekly-analytics-digest", &params()).unwrap();
        assert_eq!(digest["triggers"][0]["timeZone"], "America/New_York");
        assert!(digest.to_string().contains("me@example.org"));
    }

    #[test]
    fn missing_parameters_are_named() {
        let mut p = params();
        p.store_url = None;
        assert_eq!(
            instantiate("book-publication-pipeline", &p)
                .unwrap_err()
                .field,
            "storeUrl"
        );
        p.email = None;
        assert_eq!(
            instantiate("weekly-analytics-digest", &p)
                .unwrap_err()
                .field,
            "email"
        );
        assert_eq!(instantiate("nope", &p).unwrap_err().field, "name");
        p.project = "x".repeat(60);
        assert_eq!(
            instantiate("sales-spike-alert", &p).unwrap_err().field,
            "id"
        );
    }
}
