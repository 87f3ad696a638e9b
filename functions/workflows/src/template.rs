//! Rendering a step's input: every string leaf of the JSON is a minijinja template evaluated
//! against the run's context
//! `{"trigger": {...}, "steps": {"<id>": {"output", "error", "status"}}, "item", "index"}`.
//!
//! Choices, and why:
//! - Undefined is strict: a typo in `{{ steps.fech.output }}` must fail the step with the name
//!   it could not find, not send an empty string to an email or an HTTP endpoint.
//! - Every render has a fuel budget, so a definition (written by a project owner, run on
//!   shared workers) cannot keep a worker busy forever with nested loops.
//! - A string that is exactly one `{{ expr }}` becomes the JSON value of `expr`, so an object,
//!   a list or a number flows from one step to the next without being turned into text.
//! - No template can include another, and the builtins have no access to the file system or
//!   the network (minijinja's `loader` and `json` features are off in the workspace).

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::OnceLock;

use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde_json::Value;

use crate::pointer;

/// Instructions one render (or one expression evaluation) may execute. Real inputs use a few
/// hundred; 100k is ample for a loop over a few thousand items and stops a runaway quickly.
pub const FUEL: u64 = 100_000;

/// Why an input could not be rendered: `path` is the JSON pointer of the string leaf inside
/// the input (`""` for an expression evaluated on its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for RenderError {}

/// The one environment every template is compiled in (validation and rendering must agree).
pub(crate) fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(FUEL));
        env
    })
}

/// Whether a string needs the template engine at all; plain strings are left untouched (and
/// cost nothing).
pub(crate) fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// The expression inside a string that is exactly one `{{ expr }}` (surrounding whitespace
/// allowed), or `None`.
pub(crate) fn lone_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    (!is_template(inner) && !inner.contains("}}")).then_some(inner)
}

/// Renders every string leaf of `input` against `context`; keys are left as they are.
pub fn render_input(input: &Value, context: &Value) -> Result<Value, RenderError> {
    render_at(input, context, &mut String::new())
}

fn render_at(input: &Value, context: &Value, path: &mut String) -> Result<Value, RenderError> {
    Ok(match input {
        Value::String(s) => render_string(s, context).map_err(|message| RenderError {
            path: path.clone(),
            message,
        })?,
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&pointer("", &i.to_string()));
                out.push(render_at(item, context, path)?);
                path.truncate(len);
            }
            Value::Array(out)
        }
        Value::Object(map) => {
            let mut out = serde_json::Map::with_capacity(map.len());
            for (key, item) in map {
                let len = path.len();
                path.push_str(&pointer("", key));
                out.insert(key.clone(), render_at(item, context, path)?);
                path.truncate(len);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

fn render_string(s: &str, context: &Value) -> Result<Value, String> {
    if !is_template(s) {
        return Ok(Value::String(s.to_string()));
    }
    if let Some(expr) = lone_expression(s) {
        return eval(expr, context);
    }
    let env = environment();
    let template = env.template_from_str(s).map_err(|e| describe(&e))?;
    template.render(context).map(Value::String).map_err(|e| {
        let vars = template.undeclared_variables(true);
        explain(&e, &vars, context)
    })
}

/// Evaluates a minijinja expression (no `{{ }}`) to a JSON value; used for lone `{{ expr }}`
/// strings and for a loop's `over`.
pub fn eval_expression(expr: &str, context: &Value) -> Result<Value, RenderError> {
    eval(expr, context).map_err(|message| RenderError {
        path: String::new(),
        message,
    })
}

/// Evaluates a condition's `if` expression; the result is tested with Jinja truthiness
/// (`0`, `""`, `[]`, `{}`, `none` and `false` are false), the same as `{% if %}` in templates.
pub fn eval_condition(expr: &str, context: &Value) -> Result<bool, RenderError> {
    let env = environment();
    let wrap = |message| RenderError {
        path: String::new(),
        message,
    };
    let compiled = env
        .compile_expression(expr)
        .map_err(|e| wrap(describe(&e)))?;
    let vars = compiled.undeclared_variables(true);
    let value = compiled
        .eval(context)
        .map_err(|e| wrap(explain(&e, &vars, context)))?;
    if value.is_undefined() {
        return Err(wrap(undefined_message(&vars, context)));
    }
    Ok(value.is_true())
}

fn eval(expr: &str, context: &Value) -> Result<Value, String> {
    let env = environment();
    let compiled = env.compile_expression(expr).map_err(|e| describe(&e))?;
    let vars = compiled.undeclared_variables(true);
    let value = compiled
        .eval(context)
        .map_err(|e| explain(&e, &vars, context))?;
    if value.is_undefined() {
        return Err(undefined_message(&vars, context));
    }
    serde_json::to_value(&value).map_err(|e| format!("the result is not JSON: {e}"))
}

/// minijinja's message with its detail, without the `(in <string>:1)` location (the caller
/// gives a JSON pointer instead).
pub(crate) fn describe(e: &minijinja::Error) -> String {
    let mut message = e.kind().to_string();
    if let Some(detail) = e.detail() {
        message = format!("{message}: {detail}");
    }
    if let Some(line) = e.line().filter(|&l| l > 1) {
        message = format!("{message} (line {line})");
    }
    message
}

/// minijinja's strict-undefined error does not say which name was undefined; the template's
/// undeclared variables, walked through the context, do.
fn explain(e: &minijinja::Error, vars: &HashSet<String>, context: &Value) -> String {
    if e.kind() == ErrorKind::UndefinedError {
        undefined_message(vars, context)
    } else {
        describe(e)
    }
}

fn undefined_message(vars: &HashSet<String>, context: &Value) -> String {
    // Sorted, so that the same template always names the same variable first.
    let sorted: BTreeSet<&String> = vars.iter().collect();
    sorted
        .into_iter()
        .find_map(|var| missing_prefix(var, context))
        .map(|name| format!("undefined variable `{name}`"))
        .unwrap_or_else(|| "undefined value (an index or key that is not there)".into())
}

/// The shortest prefix of the dotted `var` that the context does not have.
fn missing_prefix(var: &str, context: &Value) -> Option<String> {
    let mut at = context;
    let mut prefix = String::new();
    for part in var.split('.') {
        if !prefix.is_empty() {
            prefix.push('.');
        }
        prefix.push_str(part);
        let next = match at {
            Value::Object(map) => map.get(part),
            Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        match next {
            Some(value) => at = value,
            None => return Some(prefix),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Value {
        json!({
            "trigger": {"data": {"words": 120, "title": "Dune"}, "projectId": "p-1"},
            "steps": {"fetch": {"output": {"body": {"units": 7}, "status": 200}, "error": null, "status": "completed"}},
            "item": "u-1",
            "index": 0,
        })
    }

    #[test]
    fn a_lone_expression_keeps_its_json_type() {
        let out = render_input(
            &json!({"all": "{{ steps.fetch.output }}", "n": " {{- trigger.data.words -}} ", "list": ["{{ [1, item] }}"]}),
            &ctx(),
        );
        assert_eq!(
            out,
            Ok(
                json!({"all": {"body": {"units": 7}, "status": 200}, "n": 120, "list": [[1, "u-1"]]})
            )
        );
    }

    #[test]
    fn mixed_text_interpolates_to_a_string() {
        let out = render_input(
            &json!({"text": "{{ trigger.data.title }} has {{ trigger.data.words }} words", "plain": "no {template}", "k": 3}),
            &ctx(),
        );
        assert_eq!(
            out,
            Ok(json!({"text": "Dune has 120 words", "plain": "no {template}", "k": 3}))
        );
    }

    #[test]
    fn a_missing_variable_is_an_error_that_names_it() {
        let err = render_input(&json!({"a": [1, "Hi {{ trigger.data.author }}"]}), &ctx());
        assert_eq!(
            err,
            Err(RenderError {
                path: "/a/1".into(),
                message: "undefined variable `trigger.data.author`".into()
            })
        );
        let err = render_input(&json!("{{ steps.nope.output }}"), &ctx());
        assert_eq!(
            err.map_err(|e| e.message),
            Err("undefined variable `steps.nope`".into())
        );
    }

    #[test]
    fn fuel_stops_a_runaway_template() {
        let looping =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let err = render_input(&json!({"x": looping}), &ctx()).map_err(|e| e.message);
        assert_eq!(err, Err("engine ran out of fuel".into()));
    }

    #[test]
    fn conditions_use_jinja_truthiness_and_strictness() {
        let c = ctx();
        assert_eq!(eval_condition("trigger.data.words >= 100", &c), Ok(true));
        assert_eq!(
            eval_condition("steps.fetch.output.body.units >= 2 * 5", &c),
            Ok(false)
        );
        assert_eq!(eval_condition("trigger.data.title", &c), Ok(true));
        assert_eq!(eval_condition("[]", &c), Ok(false));
        assert_eq!(
            eval_condition("trigger.data.goal > 3", &c).map_err(|e| e.message),
            Err("undefined variable `trigger.data.goal`".into())
        );
        assert!(eval_condition("1 +", &c).is_err());
    }
}
