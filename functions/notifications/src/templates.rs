//! Notification templates: their stored form (`inkwire:notify:template:{name}`), checking
//! that every part parses when one is saved, and rendering them with a send's `data`.
//!
//! Templates are minijinja with strict undefined behaviour: a variable the data lacks is an
//! error naming the variable and the part, never a silently blank message. HTML parts (the
//! email's `html`) are auto-escaped, text parts are not. Rendering is bounded (minijinja's
//! fuel), so a template with a runaway loop cannot hold a request.

use std::collections::BTreeSet;

use inkwire_shared::problem::Problem;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest rendered title, in characters (the same limit as a send's `title`).
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest rendered body, in characters (the same limit as a send's `body`).
pub const MAX_BODY_CHARS: usize = 10_000;
/// Longest rendered email, SMS or push part, in characters.
pub const MAX_PART_CHARS: usize = 100_000;
/// Instructions one part may run when rendered (minijinja fuel).
const FUEL: u64 = 50_000;

/// The email parts of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailTemplate {
    pub subject: String,
    pub html: String,
    pub text: String,
}

/// The push parts of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushTemplate {
    pub title: String,
    pub body: String,
}

/// A template as saved and as `GET` shows it: every part is a template string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Template {
    pub title: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushTemplate>,
}

/// The rendered email.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedEmail {
    pub subject: String,
    pub html: String,
    pub text: String,
}

/// A template rendered with one send's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub title: String,
    pub body: String,
    pub email: Option<RenderedEmail>,
    pub sms: Option<String>,
    pub push: Option<(String, String)>,
}

/// Why a template could not be saved or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A part does not parse (`422 template_invalid` when saved).
    #[error("template part {part:?} does not parse: {message}")]
    Invalid {
        part: &'static str,
        line: Option<usize>,
        message: String,
    },
    /// The data lacks a variable a part uses (`400 template_variable_missing`).
    #[error("template part {part:?} uses variable {variable:?}, which the send's data lacks")]
    VariableMissing {
        part: &'static str,
        variable: String,
        line: Option<usize>,
    },
    /// Any other failure while rendering a part with this data (`400 template_render_failed`).
    #[error("template part {part:?} failed to render: {message}")]
    Render {
        part: &'static str,
        line: Option<usize>,
        message: String,
    },
    /// A rendered part is longer than allowed (`400 template_output_too_long`).
    #[error("template part {part:?} renders to {chars} characters; at most {max} are allowed")]
    TooLong {
        part: &'static str,
        chars: usize,
        max: usize,
    },
}

impl From<TemplateError> for Problem {
    fn from(e: TemplateError) -> Problem {
        let detail = e.to_string();
        match e {
            TemplateError::Invalid {
                part,
                line,
                message,
            } => {
                let p = Problem::unprocessable("template_invalid", detail)
                    .with_extension("part", part)
                    .with_extension("message", message);
                with_line(p, line)
            }
            TemplateError::VariableMissing {
                part,
                variable,
                line,
            } => {
                let p = Problem::bad_request("template_variable_missing", detail)
                    .with_extension("part", part)
                    .with_extension("variable", variable);
                with_line(p, line)
            }
            TemplateError::Render { part, line, .. } => {
                let p = Problem::bad_request("template_render_failed", detail)
                    .with_extension("part", part);
                with_line(p, line)
            }
            TemplateError::TooLong { part, .. } => {
                Problem::bad_request("template_output_too_long", detail)
                    .with_extension("part", part)
            }
        }
    }
}

fn with_line(p: Problem, line: Option<usize>) -> Problem {
    match line {
        Some(l) => p.with_extension("line", l),
        None => p,
    }
}

/// Is `name` a template name (`[a-z0-9][a-z0-9_.-]{0,63}`)? Names become Redis key parts.
pub fn is_valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'0'..=b'9'))
        && name.len() <= 64
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

pub fn key(name: &str) -> String {
    format!("inkwire:notify:template:{name}")
}

/// The environment every part is compiled and rendered in.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    // Parts are named after their place in the template: only `email.html` is HTML.
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env
}

impl Template {
    /// Every part with its name (`title`, `email.html`, `push.body`, …).
    pub fn parts(&self) -> Vec<(&'static str, &str)> {
        let mut out = vec![("title", self.title.as_str()), ("body", self.body.as_str())];
        if let Some(e) = &self.email {
            out.push(("email.subject", &e.subject));
            out.push(("email.html", &e.html));
            out.push(("email.text", &e.text));
        }
        if let Some(s) = &self.sms {
            out.push(("sms", s));
        }
        if let Some(p) = &self.push {
            out.push(("push.title", &p.title));
            out.push(("push.body", &p.body));
        }
        out
    }

    /// Checks that every part parses; the first that does not is named with minijinja's
    /// message (which carries the line).
    pub fn check(&self) -> Result<(), TemplateError> {
        let env = environment();
        for (part, source) in self.parts() {
            env.template_from_named_str(part, source)
                .map_err(|e| TemplateError::Invalid {
                    part,
                    line: e.line(),
                    message: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Renders every part with `data` (a JSON object).
    pub fn render(&self, data: &Value) -> Result<Rendered, TemplateError> {
        let env = environment();
        let ctx = minijinja::Value::from_serialize(data);
        let render = |part: &'static str, source: &str, max: usize| {
            let tmpl =
                env.template_from_named_str(part, source)
                    .map_err(|e| TemplateError::Invalid {
                        part,
                        line: e.line(),
                        message: e.to_string(),
                    })?;
            let out = tmpl.render(&ctx).map_err(|e| {
                if e.kind() == ErrorKind::UndefinedError
                    && let Some(variable) = missing_variable(&tmpl, data)
                {
                    return TemplateError::VariableMissing {
                        part,
                        variable,
                        line: e.line(),
                    };
                }
                TemplateError::Render {
                    part,
                    line: e.line(),
                    message: e.to_string(),
                }
            })?;
            let chars = out.chars().count();
            if chars > max {
                return Err(TemplateError::TooLong { part, chars, max });
            }
            Ok(out)
        };
        Ok(Rendered {
            title: render("title", &self.title, MAX_TITLE_CHARS)?,
            body: render("body", &self.body, MAX_BODY_CHARS)?,
            email: match &self.email {
                Some(e) => Some(RenderedEmail {
                    subject: render("email.subject", &e.subject, MAX_TITLE_CHARS * 5)?,
                    html: render("email.html", &e.html, MAX_PART_CHARS)?,
                    text: render("email.text", &e.text, MAX_PART_CHARS)?,
                }),
                None => None,
            },
            sms: match &self.sms {
                Some(s) => Some(render("sms", s, MAX_PART_CHARS)?),
                None => None,
            },
            push: match &self.push {
                Some(p) => Some((
                    render("push.title", &p.title, MAX_TITLE_CHARS)?,
                    render("push.body", &p.body, MAX_PART_CHARS)?,
                )),
                None => None,
            },
        })
    }
}

/// The first variable (in name order) that `tmpl` looks up and `data` lacks: a top-level
/// name, or a dotted path (`book.title`) whose last step is missing. minijinja's undefined
/// error does not name the variable, so it is found by the template's own analysis.
fn missing_variable(tmpl: &minijinja::Template<'_, '_>, data: &Value) -> Option<String> {
    let names: BTreeSet<String> = tmpl.undeclared_variables(true).into_iter().collect();
    names.into_iter().find(|path| {
        let mut at = data;
        for step in path.split('.') {
            match at.get(step) {
                Some(next) => at = next,
                None => return true,
            }
        }
        false
    })
}

/// Saves `template` as `name` (checked first). Returns whether it replaced one.
pub async fn save(
    redis: &mut ConnectionManager,
    name: &str,
    template: &Template,
) -> redis::RedisResult<bool> {
    let json = serde_json::to_string(template).expect("templates serialize");
    let old: Option<String> = redis::cmd("SET")
        .arg(key(name))
        .arg(json)
        .arg("GET")
        .query_async(redis)
        .await?;
    Ok(old.is_some())
}

/// The template saved as `name`.
pub async fn load(
    redis: &mut ConnectionManager,
    name: &str,
) -> redis::RedisResult<Option<Template>> {
    let raw: Option<String> = redis.get(key(name)).await?;
    // Only `save` writes the key, so what is stored parses.
    Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
}

/// Deletes the template `name`; whether it existed.
pub async fn delete(redis: &mut ConnectionManager, name: &str) -> redis::RedisResult<bool> {
    let n: i64 = redis.del(key(name)).await?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(title: &str, body: &str) -> Template {
        Template {
            title: title.into(),
            body: body.into(),
            email: None,
            sms: None,
            push: None,
        }
    }

    #[test]
    fn names() {
        for ok in ["welcome", "a", "9", "book.published-v2_x", &"a".repeat(64)] {
            assert!(is_valid_name(ok), "{ok:?}");
        }
        for bad in [
            "",
            "Welcome",
            ".a",
            "-a",
            "a b",
            "a/b",
            "a:b",
            &"a".repeat(65),
            "é",
        ] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn renders_every_part_and_escapes_only_html() {
        let t = Template {
            title: "Hi {{ name }}".into(),
            body: "{{ book.title }} is live".into(),
            email: Some(EmailTemplate {
                subject: "{{ book.title }}".into(),
                html: "<p>{{ book.title }}</p>".into(),
                text: "{{ book.title }}".into(),
            }),
            sms: Some("{{ name }}: {{ book.title }}".into()),
            push: Some(PushTemplate {
                title: "{{ name }}".into(),
                body: "{% for t in tags %}{{ t }} {% endfor %}".into(),
            }),
        };
        t.check().unwrap();
        let data = json!({"name": "Ada", "book": {"title": "<Tom & Jerry>"}, "tags": ["a", "b"]});
        let r = t.render(&data).unwrap();
        assert_eq!(r.title, "Hi Ada");
        assert_eq!(r.body, "<Tom & Jerry> is live");
        let email = r.email.unwrap();
        assert_eq!(email.html, "<p>&lt;Tom &amp; Jerry&gt;</p>");
        assert_eq!(email.text, "<Tom & Jerry>");
        assert_eq!(email.subject, "<Tom & Jerry>");
        assert_eq!(r.sms.unwrap(), "Ada: <Tom & Jerry>");
        assert_eq!(r.push.unwrap(), ("Ada".to_string(), "a b ".to_string()));
    }

    #[test]
    fn a_missing_variable_is_named_with_its_part() {
        let t = template("Hi {{ name }}", "Line one\n{{ book.title }}");
        let e = t.render(&json!({"name": "Ada", "book": {}})).unwrap_err();
        assert_eq!(
            e,
            TemplateError::VariableMissing {
                part: "body",
                variable: "book.title".into(),
                line: Some(2)
            }
        );
        let e = t.render(&json!({})).unwrap_err();
        assert!(
            matches!(&e, TemplateError::VariableMissing { part: "title", variable, .. } if variable == "name"),
            "{e:?}"
        );
        // A default makes a variable optional.
        let t = template("Hi {{ name | default('there') }}", "x");
        assert_eq!(t.render(&json!({})).unwrap().title, "Hi there");
    }

    #[test]
    fn a_part_that_does_not_parse_is_named_with_its_line() {
        let mut t = template("ok", "fine");
        t.push = Some(PushTemplate {
            title: "ok".into(),
            body: "one\ntwo {{ name ".into(),
        });
        let e = t.check().unwrap_err();
        match e {
            TemplateError::Invalid {
                part,
                line,
                message,
            } => {
                assert_eq!(part, "push.body");
                assert_eq!(line, Some(2));
                assert!(message.contains("syntax error"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(template("{% if %}", "x").check().is_err());
        assert!(template("{{ a }", "x").check().is_err());
    }

    #[test]
    fn output_is_bounded() {
        let t = template("{{ x * 300 }}", "b");
        let e = t.render(&json!({"x": "a"})).unwrap_err();
        assert!(
            matches!(
                e,
                TemplateError::TooLong {
                    part: "title",
                    chars: 300,
                    max: 200
                }
            ),
            "{e:?}"
        );
        let t = template(
            "t",
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        );
        let e = t.render(&json!({})).unwrap_err();
        assert!(
            matches!(e, TemplateError::Render { part: "body", .. }),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<Template, _> =
            serde_json::from_value(json!({"title": "t", "body": "b", "html": "x"}));
        assert!(r.is_err());
        let r: Result<Template, _> = serde_json::from_value(
            json!({"title": "t", "body": "b", "email": {"subject": "s", "html": "h", "text": "t", "cc": 1}}),
        );
        assert!(r.is_err());
    }
}
