//! Checking a definition before it is registered, from the raw JSON rather than from serde's
//! errors: that way every problem gets a JSON pointer (`/steps/2/dependsOn/0`) and a message
//! written for the person fixing the definition, and all of them are reported at once.
//!
//! What is checked: shapes and types (unknown fields are refused, a typo must not silently
//! fall back to a default), limits, step ids (unique), dependencies (known, not the step
//! itself, no cycles), templates (they compile; `steps.X` is read only when X is a transitive
//! dependency, i.e. certainly finished), per-action required input fields and values that can
//! be checked now (a literal file path may not escape the sandbox). A field whose value is a
//! template is checked when the step runs instead. Event categories and types only have to
//! look like identifiers here: the engine checks them against the event catalogue, which
//! this crate does not depend on.

use std::collections::{BTreeSet, HashMap};

use serde_json::{Map, Value};

use crate::cron;
use crate::dag;
use crate::definition::{Action, Definition, is_identifier, parse_duration};
use crate::pointer;
use crate::template::{describe, environment, is_template, lone_expression};

pub const MAX_STEPS: usize = 100;
pub const MAX_TRIGGERS: usize = 20;
pub const MAX_FILTER_CONDITIONS: usize = 20;
/// Largest `input` (and `compensate.input`) of a step, serialized.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;
pub const MAX_TIMEOUT_MS: u64 = 24 * 3_600_000;
pub const MAX_DELAY_MS: u64 = 30 * 86_400_000;
/// Errors reported at most; past that a definition is too broken to list them all usefully.
pub const MAX_ERRORS: usize = 100;

/// One problem in a definition: `path` is a JSON pointer into the submitted document.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DefinitionError {
    pub path: String,
    pub message: String,
}

/// Parses and checks a definition; `Err` lists every problem found, in document order.
pub fn parse_definition(json: &Value) -> Result<Definition, Vec<DefinitionError>> {
    let mut c = Checker::default();
    c.definition(json);
    if c.errors.is_empty() {
        return serde_json::from_value(json.clone()).map_err(|e| {
            vec![DefinitionError {
                path: String::new(),
                message: format!("not a definition: {e}"),
            }]
        });
    }
    if c.errors.len() > MAX_ERRORS {
        let more = c.errors.len() - MAX_ERRORS;
        c.errors.truncate(MAX_ERRORS);
        c.err("", format!("... and {more} more errors"));
    }
    Err(c.errors)
}

/// What the graph checks need to know about each step once its shape was checked.
#[derive(Default)]
struct StepInfo {
    id: Option<String>,
    action: Option<Action>,
    /// `(index in dependsOn, step index)` of the known dependencies.
    deps: Vec<(usize, usize)>,
}

#[derive(Default)]
struct Checker {
    errors: Vec<DefinitionError>,
}

/// A JSON object being checked, and where it is.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl Obj<'_> {
    fn at(&self, key: &str) -> String {
        pointer(&self.path, key)
    }
}

/// A value that is a template string: its type and value are only known when the step runs.
fn dynamic(v: &Value) -> bool {
    v.as_str().is_some_and(is_template)
}

impl Checker {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(DefinitionError {
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// `v` as an object whose fields are all in `allowed`.
    fn object<'a>(&mut self, v: &'a Value, path: &str, allowed: &[&str]) -> Option<Obj<'a>> {
        let Some(map) = v.as_object() else {
            self.err(path, "must be an object");
            return None;
        };
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                let expected = allowed.join(", ");
                self.err(
                    &pointer(path, key),
                    format!("unknown field (expected one of: {expected})"),
                );
            }
        }
        Some(Obj {
            map,
            path: path.to_string(),
        })
    }

    fn field<'a>(&mut self, o: &Obj<'a>, key: &str, required: bool) -> Option<&'a Value> {
        let v = o.map.get(key);
        if v.is_none() && required {
            self.err(&o.at(key), "required");
        }
        v
    }

    fn string<'a>(&mut self, o: &Obj<'a>, key: &str, required: bool) -> Option<&'a str> {
        let v = self.field(o, key, required)?;
        let s = v.as_str();
        if s.is_none() {
            self.err(&o.at(key), "must be a string");
        }
        s
    }

    fn identifier<'a>(&mut self, o: &Obj<'a>, key: &str) -> Option<&'a str> {
        let s = self.string(o, key, true)?;
        if !is_identifier(s) {
            self.err(&o.at(key), "must be 1-64 letters, digits, '_' or '-'");
            return None;
        }
        Some(s)
    }

    fn integer(&mut self, o: &Obj, key: &str, min: u64, max: u64) -> Option<u64> {
        let v = self.field(o, key, false)?;
        let n = v.as_u64().filter(|n| (min..=max).contains(n));
        if n.is_none() {
            self.err(
                &o.at(key),
                format!("must be a whole number from {min} to {max}"),
            );
        }
        n
    }

    fn one_of(&mut self, o: &Obj, key: &str, required: bool, options: &[&str]) {
        if let Some(v) = self.field(o, key, required)
            && !dynamic(v)
            && !v.as_str().is_some_and(|s| options.contains(&s))
        {
            self.err(
                &o.at(key),
                format!("must be one of: {}", options.join(", ")),
            );
        }
    }

    /// A duration field in `(0, max_ms]`; returns its milliseconds.
    fn duration(&mut self, o: &Obj, key: &str, max_ms: u64) -> Option<u64> {
        let s = self.string(o, key, false)?;
        match parse_duration(s).map(|d| d.as_millis()) {
            Ok(ms) if ms > 0 && ms <= max_ms => Some(ms),
            Ok(_) => {
                let max = crate::Duration::from_millis(max_ms);
                self.err(&o.at(key), format!("must be more than 0 and at most {max}"));
                None
            }
            Err(e) => {
                self.err(&o.at(key), e);
                None
            }
        }
    }

    fn list<'a>(&mut self, o: &Obj<'a>, key: &str, min: usize, max: usize) -> Option<&'a [Value]> {
        let v = self.field(o, key, min > 0)?;
        let Some(items) = v.as_array() else {
            self.err(&o.at(key), "must be an array");
            return None;
        };
        if items.len() < min || items.len() > max {
            self.err(&o.at(key), format!("must have {min} to {max} items"));
        }
        Some(items)
    }

    fn definition(&mut self, json: &Value) {
        let allowed = [
            "id",
            "version",
            "name",
            "description",
            "projectId",
            "triggers",
            "steps",
        ];
        let Some(o) = self.object(json, "", &allowed) else {
            return;
        };
        self.identifier(&o, "id");
        if self.field(&o, "version", true).is_some() {
            self.integer(&o, "version", 1, u64::from(u32::MAX));
        }
        for (key, max) in [("name", 200), ("description", 2000)] {
            if let Some(s) = self.string(&o, key, false)
                && (s.is_empty() || s.chars().count() > max)
            {
                self.err(&o.at(key), format!("must be 1 to {max} characters"));
            }
        }
        self.identifier(&o, "projectId");
        for (i, t) in self
            .list(&o, "triggers", 1, MAX_TRIGGERS)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            self.trigger(t, &pointer("/triggers", &i.to_string()));
        }
        let steps = self.list(&o, "steps", 1, MAX_STEPS).unwrap_or_default();
        let mut infos: Vec<StepInfo> = Vec::with_capacity(steps.len());
        let mut first_at: HashMap<&str, usize> = HashMap::new();
        for (i, s) in steps.iter().enumerate() {
            let info = self.step_shape(s, &format!("/steps/{i}"));
            if let Some(id) = s
                .get("id")
                .and_then(Value::as_str)
                .filter(|_| info.id.is_some())
            {
                match first_at.get(id) {
                    Some(j) => self.err(
                        &format!("/steps/{i}/id"),
                        format!("duplicate step id `{id}` (also /steps/{j})"),
                    ),
                    None => {
                        first_at.insert(id, i);
                    }
                }
            }
            infos.push(info);
        }
        self.graph(steps, &mut infos, &first_at);
    }

    fn trigger(&mut self, t: &Value, path: &str) {
        let kind = t.get("type").and_then(Value::as_str);
        let allowed: &[&str] = match kind {
            Some("event") => &["type", "category", "eventType", "filter"],
            Some("cron") => &["type", "schedule", "timeZone"],
            Some("manual") => &["type"],
            _ => {
                self.err(
                    &pointer(path, "type"),
                    "must be one of: event, cron, manual",
                );
                return;
            }
        };
        let Some(o) = self.object(t, path, allowed) else {
            return;
        };
        match kind {
            Some("event") => {
                for key in ["category", "eventType"] {
                    if let Some(s) = self.string(&o, key, true)
                        && !event_name(s)
                    {
                        self.err(
                            &o.at(key),
                            "must be a lower-case name such as `writing` or `word_added`",
                        );
                    }
                }
                let filter = self
                    .list(&o, "filter", 0, MAX_FILTER_CONDITIONS)
                    .unwrap_or_default();
                for (i, cond) in filter.iter().enumerate() {
                    self.filter_condition(cond, &format!("{path}/filter/{i}"));
                }
            }
            Some("cron") => {
                if let Some(s) = self.string(&o, "schedule", true)
                    && let Err(e) = cron::parse_schedule(s)
                {
                    self.err(&o.at("schedule"), e);
                }
                if let Some(s) = self.string(&o, "timeZone", false)
                    && let Err(e) = cron::parse_time_zone(s)
                {
                    self.err(&o.at("timeZone"), e);
                }
            }
            _ => {}
        }
    }

    fn filter_condition(&mut self, cond: &Value, path: &str) {
        let Some(o) = self.object(cond, path, &["path", "op", "value"]) else {
            return;
        };
        if let Some(p) = self.string(&o, "path", true)
            && !filter_path(p)
        {
            self.err(&o.at("path"), "must be `projectId`, `userId`, `documentId`, `data` or `data.<field>[.<field>...]`");
        }
        let ops = ["eq", "ne", "gt", "gte", "lt", "lte", "in", "exists"];
        let op = self.string(&o, "op", true);
        if op.is_some_and(|op| !ops.contains(&op)) {
            self.err(&o.at("op"), format!("must be one of: {}", ops.join(", ")));
            return;
        }
        let value = o.map.get("value");
        let problem = match (op, value) {
            (None, _) | (Some("exists"), None | Some(Value::Bool(_))) => None,
            (Some("exists"), Some(_)) => Some("must be true or false (or left out: true)"),
            (Some(_), None) => Some("required"),
            (Some("gt" | "gte" | "lt" | "lte"), Some(v)) if !v.is_number() => {
                Some("must be a number")
            }
            (Some("in"), Some(v)) if !v.is_array() => Some("must be an array"),
            _ => None,
        };
        if let Some(message) = problem {
            self.err(&o.at("value"), message);
        }
    }

    fn step_shape(&mut self, s: &Value, path: &str) -> StepInfo {
        let allowed = [
            "id",
            "action",
            "input",
            "dependsOn",
            "retry",
            "timeout",
            "onError",
            "compensate",
        ];
        let mut info = StepInfo::default();
        let Some(o) = self.object(s, path, &allowed) else {
            return info;
        };
        info.id = self.identifier(&o, "id").map(str::to_string);
        info.action = self.action(&o, "action", true, &[]);
        if let Some(deps) = self.list(&o, "dependsOn", 0, MAX_STEPS) {
            for (i, d) in deps.iter().enumerate() {
                if !d.is_string() {
                    self.err(&format!("{path}/dependsOn/{i}"), "must be a step id");
                }
            }
        }
        if let Some(r) = self.field(&o, "retry", false) {
            self.retry(r, &o.at("retry"));
        }
        self.duration(&o, "timeout", MAX_TIMEOUT_MS);
        self.one_of(
            &o,
            "onError",
            false,
            &["fail", "continue", "retry", "rollback"],
        );
        if let Some(action) = info.action {
            let empty = Value::Object(Map::new());
            self.input(action, o.map.get("input").unwrap_or(&empty), &o.at("input"));
        }
        if let Some(comp) = self.field(&o, "compensate", false) {
            // Undoing a wait or a branch means nothing: only actions with effects.
            let effects = &Action::ALL[..7];
            self.action_with_input(comp, &o.at("compensate"), effects);
        }
        info
    }

    /// An `{action, input}` object (a compensation, a loop's body), `action` among `only`.
    fn action_with_input(&mut self, v: &Value, path: &str, only: &[Action]) {
        if let Some(o) = self.object(v, path, &["action", "input"])
            && let Some(action) = self.action(&o, "action", true, only)
        {
            let empty = Value::Object(Map::new());
            self.input(action, o.map.get("input").unwrap_or(&empty), &o.at("input"));
        }
    }

    /// A minijinja expression (a condition's `if`, a loop's `over`).
    fn expression(&mut self, o: &Obj, key: &str, expr: &str) {
        if let Err(e) = environment().compile_expression(expr) {
            let hint = if is_template(expr) {
                " (write the expression without {{ }})"
            } else {
                ""
            };
            let message = format!("expression does not parse: {}{hint}", describe(&e));
            self.err(&o.at(key), message);
        }
    }

    /// An action name; `only`, when not empty, is the list of actions allowed there.
    fn action(&mut self, o: &Obj, key: &str, required: bool, only: &[Action]) -> Option<Action> {
        let name = self.string(o, key, required)?;
        let all = Action::ALL.map(Action::name).join(", ");
        match Action::from_name(name) {
            None => self.err(
                &o.at(key),
                format!("unknown action `{name}` (expected one of: {all})"),
            ),
            Some(a) if !only.is_empty() && !only.contains(&a) => {
                let names: Vec<_> = only.iter().map(|a| a.name()).collect();
                self.err(
                    &o.at(key),
                    format!(
                        "`{name}` is not allowed here (expected one of: {})",
                        names.join(", ")
                    ),
                );
            }
            Some(a) => return Some(a),
        }
        None
    }

    fn retry(&mut self, r: &Value, path: &str) {
        let allowed = [
            "maxAttempts",
            "initialInterval",
            "backoffCoefficient",
            "maxInterval",
            "jitter",
            "nonRetryable",
        ];
        let Some(o) = self.object(r, path, &allowed) else {
            return;
        };
        self.integer(&o, "maxAttempts", 1, 20);
        let initial = self
            .duration(&o, "initialInterval", MAX_TIMEOUT_MS)
            .unwrap_or(1_000);
        if let Some(max) = self.duration(&o, "maxInterval", MAX_TIMEOUT_MS)
            && max < initial
        {
            self.err(
                &o.at("maxInterval"),
                "must not be less than initialInterval",
            );
        }
        if let Some(v) = self.field(&o, "backoffCoefficient", false)
            && !v.as_f64().is_some_and(|f| (1.0..=10.0).contains(&f))
        {
            self.err(
                &o.at("backoffCoefficient"),
                "must be a number from 1.0 to 10.0",
            );
        }
        if self
            .field(&o, "jitter", false)
            .is_some_and(|v| !v.is_boolean())
        {
            self.err(&o.at("jitter"), "must be true or false");
        }
        for (i, v) in self
            .list(&o, "nonRetryable", 0, 100)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if v.as_str().is_none_or(|s| s.is_empty()) {
                self.err(
                    &format!("{path}/nonRetryable/{i}"),
                    "must be a non-empty string",
                );
            }
        }
    }

    /// The fields each action needs in its input (values that are templates are checked at
    /// run time). Fields other than these are left to the action: they may add options.
    fn input(&mut self, action: Action, input: &Value, path: &str) {
        if serde_json::to_string(input).map_or(0, |s| s.len()) > MAX_INPUT_BYTES {
            self.err(
                path,
                format!("must be at most {} KiB of JSON", MAX_INPUT_BYTES / 1024),
            );
        }
        let Some(map) = input.as_object() else {
            self.err(path, "must be an object");
            return;
        };
        let o = Obj {
            map,
            path: path.to_string(),
        };
        let text = |c: &mut Checker, key: &str, required: bool| {
            if let Some(v) = c.field(&o, key, required)
                && !v.is_string()
            {
                c.err(&o.at(key), "must be a string");
            }
        };
        let either = |c: &mut Checker, a: &str, b: &str| {
            if !map.contains_key(a) && !map.contains_key(b) {
                c.err(path, format!("needs `{a}` or `{b}`"));
            }
        };
        match action {
            Action::Http => {
                if let Some(url) = self.string(&o, "url", true)
                    && !is_template(url)
                    && !(url.starts_with("http://") || url.starts_with("https://"))
                {
                    self.err(&o.at("url"), "must be an http:// or https:// URL");
                }
                self.one_of(
                    &o,
                    "method",
                    false,
                    &["GET", "POST", "PUT", "PATCH", "DELETE"],
                );
                self.one_of(&o, "auth", false, &["inkwire"]);
            }
            Action::Redis => {
                let ops = [
                    "get", "set", "incr", "hget", "hset", "hincrby", "hgetall", "del",
                ];
                self.one_of(&o, "op", true, &ops);
                text(self, "key", true);
            }
            Action::Email => {
                if let Some(to) = self.field(&o, "to", true)
                    && !to.is_string()
                    && !strings(to)
                {
                    let message = "must be an address or a non-empty list of addresses";
                    self.err(&o.at("to"), message);
                }
                text(self, "subject", true);
                either(self, "text", "html");
            }
            Action::Sms => {
                text(self, "to", true);
                text(self, "text", true);
            }
            Action::Notification => {
                either(self, "userId", "userIds");
                text(self, "userId", false);
                if let Some(v) = self.field(&o, "userIds", false)
                    && !dynamic(v)
                    && !strings(v)
                {
                    self.err(&o.at("userIds"), "must be a non-empty list of user ids");
                }
                text(self, "category", true);
                self.one_of(&o, "priority", true, &["critical", "high", "medium", "low"]);
            }
            Action::Ai => either(self, "prompt", "messages"),
            Action::File => {
                self.one_of(&o, "op", true, &["read", "write", "list", "epub"]);
                if let Some(p) = self.string(&o, "path", true)
                    && !is_template(p)
                    && let Err(e) = sandboxed_path(p)
                {
                    self.err(&o.at("path"), e);
                }
                if map.get("op").and_then(Value::as_str) == Some("write") {
                    self.field(&o, "content", true);
                }
                if map.get("op").and_then(Value::as_str) == Some("epub") {
                    text(self, "title", true);
                    either(self, "chapters", "content");
                }
            }
            Action::Delay => {
                either(self, "duration", "until");
                if map.get("duration").is_some_and(|v| !dynamic(v)) {
                    self.duration(&o, "duration", MAX_DELAY_MS);
                }
                text(self, "until", false);
            }
            Action::Condition => {
                if let Some(expr) = self.string(&o, "if", true) {
                    self.expression(&o, "if", expr);
                }
                for key in ["then", "else"] {
                    for (i, v) in self
                        .list(&o, key, 0, MAX_STEPS)
                        .unwrap_or_default()
                        .iter()
                        .enumerate()
                    {
                        if !v.is_string() {
                            self.err(&format!("{}/{i}", o.at(key)), "must be a step id");
                        }
                    }
                }
            }
            Action::Loop => {
                if let Some(over) = self.field(&o, "over", true) {
                    match over.as_str() {
                        Some(expr) if !is_template(expr) => self.expression(&o, "over", expr),
                        Some(_) => {}
                        None if over.is_array() => {}
                        None => {
                            self.err(&o.at("over"), "must be an expression, a template or a list")
                        }
                    }
                }
                if let Some(step) = self.field(&o, "step", true) {
                    // One action per item: no branches or nested loops inside a loop.
                    self.action_with_input(step, &o.at("step"), &Action::ALL[..8]);
                }
                self.integer(&o, "concurrency", 1, 100);
            }
        }
    }

    /// Dependencies, cycles, condition branches and templates: what needs every step.
    fn graph(&mut self, steps: &[Value], infos: &mut [StepInfo], index: &HashMap<&str, usize>) {
        for (i, s) in steps.iter().enumerate() {
            let deps = s
                .get("dependsOn")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for (k, d) in deps.iter().enumerate() {
                let Some(name) = d.as_str() else { continue };
                let path = format!("/steps/{i}/dependsOn/{k}");
                match index.get(name) {
                    None => self.err(&path, format!("unknown step `{name}`")),
                    Some(&j) if j == i => self.err(&path, "a step cannot depend on itself"),
                    Some(&j) if infos[i].deps.iter().any(|&(_, x)| x == j) => {
                        self.err(&path, format!("`{name}` is listed twice"))
                    }
                    Some(&j) => infos[i].deps.push((k, j)),
                }
            }
        }
        let deps: Vec<Vec<usize>> = infos
            .iter()
            .map(|s| s.deps.iter().map(|&(_, j)| j).collect())
            .collect();
        self.cycles(infos, &deps);
        for (i, s) in steps.iter().enumerate() {
            let base = format!("/steps/{i}");
            let mut readable: BTreeSet<&str> = dag::ancestors(&deps, i)
                .into_iter()
                .filter_map(|j| infos[j].id.as_deref())
                .collect();
            if infos[i].action == Some(Action::Condition) {
                self.branches(s, i, infos, index, &deps);
            }
            if let Some(input) = s.get("input") {
                let skip = match infos[i].action {
                    Some(Action::Condition) => Some("if"),
                    Some(Action::Loop) if s.pointer("/input/over").is_some_and(|v| !dynamic(v)) => {
                        Some("over")
                    }
                    _ => None,
                };
                if let Some(key) = skip
                    && let Some(expr) = input.get(key).and_then(Value::as_str)
                    && let Ok(e) = environment().compile_expression(expr)
                {
                    self.step_refs(
                        e.undeclared_variables(true),
                        &readable,
                        &format!("{base}/input/{key}"),
                    );
                }
                self.templates(input, &format!("{base}/input"), &readable, skip);
            }
            // A compensation runs after its step completed: it may read the step's own output.
            if let Some(id) = infos[i].id.as_deref() {
                readable.insert(id);
            }
            if let Some(input) = s.pointer("/compensate/input") {
                self.templates(input, &format!("{base}/compensate/input"), &readable, None);
            }
        }
    }

    /// Depth-first search along `dependsOn`; each back edge closes a cycle, reported at the
    /// `dependsOn` entry that closes it.
    fn cycles(&mut self, infos: &[StepInfo], deps: &[Vec<usize>]) {
        if dag::topological_order(deps).is_ok() {
            return;
        }
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnStack,
            Done,
        }
        fn visit(
            c: &mut Checker,
            i: usize,
            infos: &[StepInfo],
            mark: &mut [Mark],
            stack: &mut Vec<usize>,
        ) {
            mark[i] = Mark::OnStack;
            stack.push(i);
            for &(k, j) in &infos[i].deps {
                match mark[j] {
                    Mark::New => visit(c, j, infos, mark, stack),
                    Mark::OnStack => {
                        let from = stack.iter().position(|&s| s == j).unwrap_or(0);
                        let mut names: Vec<&str> = stack[from..]
                            .iter()
                            .map(|&s| infos[s].id.as_deref().unwrap_or("?"))
                            .collect();
                        names.push(infos[j].id.as_deref().unwrap_or("?"));
                        let message = format!(
                            "dependency cycle: {} (each step depends on the next)",
                            names.join(" → ")
                        );
                        c.err(&format!("/steps/{i}/dependsOn/{k}"), message);
                    }
                    Mark::Done => {}
                }
            }
            stack.pop();
            mark[i] = Mark::Done;
        }
        let mut mark = vec![Mark::New; infos.len()];
        for i in 0..infos.len() {
            if mark[i] == Mark::New {
                visit(self, i, infos, &mut mark, &mut Vec::new());
            }
        }
    }

    /// A condition's `then` / `else` name steps that wait for it (list it in `dependsOn`), so
    /// that the engine can skip the branch not taken before any of its steps starts.
    fn branches(
        &mut self,
        s: &Value,
        i: usize,
        infos: &[StepInfo],
        index: &HashMap<&str, usize>,
        deps: &[Vec<usize>],
    ) {
        let mut seen = BTreeSet::new();
        for key in ["then", "else"] {
            let ids = s
                .pointer(&format!("/input/{key}"))
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for (k, v) in ids.iter().enumerate() {
                let Some(name) = v.as_str() else { continue };
                let path = format!("/steps/{i}/input/{key}/{k}");
                let cond = infos[i].id.as_deref().unwrap_or("?");
                match index.get(name) {
                    None => self.err(&path, format!("unknown step `{name}`")),
                    Some(&j) if !deps[j].contains(&i) => {
                        self.err(
                            &path,
                            format!("step `{name}` must list `{cond}` in its dependsOn"),
                        );
                    }
                    Some(_) if !seen.insert(name) => self.err(
                        &path,
                        format!("`{name}` is already in a branch of `{cond}`"),
                    ),
                    Some(_) => {}
                }
            }
        }
    }

    /// Every string leaf compiles as a template and reads only finished steps.
    fn templates(&mut self, v: &Value, path: &str, readable: &BTreeSet<&str>, skip: Option<&str>) {
        match v {
            Value::String(s) if is_template(s) => {
                let env = environment();
                let vars = match lone_expression(s) {
                    Some(expr) => env
                        .compile_expression(expr)
                        .map(|e| e.undeclared_variables(true)),
                    None => env
                        .template_from_str(s)
                        .map(|t| t.undeclared_variables(true)),
                };
                match vars {
                    Ok(vars) => self.step_refs(vars, readable, path),
                    Err(e) => self.err(path, format!("template does not parse: {}", describe(&e))),
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.templates(item, &pointer(path, &i.to_string()), readable, None);
                }
            }
            Value::Object(map) => {
                for (key, item) in map.iter().filter(|(k, _)| Some(k.as_str()) != skip) {
                    self.templates(item, &pointer(path, key), readable, None);
                }
            }
            _ => {}
        }
    }

    /// `steps.X...` is only readable when X certainly finished before this step started.
    /// (A subscript such as `steps[name]` cannot be checked here; strict undefined catches it
    /// at run time.)
    fn step_refs(
        &mut self,
        vars: impl IntoIterator<Item = String>,
        readable: &BTreeSet<&str>,
        path: &str,
    ) {
        let mut bad: BTreeSet<String> = BTreeSet::new();
        for var in vars {
            if let Some(step) = var
                .strip_prefix("steps.")
                .map(|r| r.split('.').next().unwrap_or(r))
                && !readable.contains(step)
            {
                bad.insert(step.to_string());
            }
        }
        for step in bad {
            self.err(path, format!("reads `steps.{step}`, but `{step}` is not a (transitive) dependency of this step, so it may not have finished"));
        }
    }
}

/// A non-empty list of strings.
fn strings(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_string))
}

/// Event category and type names, as the envelope schema writes them.
fn event_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || *c == b'_')
}

fn filter_path(p: &str) -> bool {
    match p.strip_prefix("data") {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('.')
            .is_some_and(|r| r.split('.').all(is_identifier)),
        None => matches!(p, "projectId" | "userId" | "documentId"),
    }
}

/// A literal path of the file action: relative, and never climbing out of the sandbox.
pub(crate) fn sandboxed_path(p: &str) -> Result<(), &'static str> {
    let b = p.as_bytes();
    if p.is_empty() {
        Err("must not be empty")
    } else if p.starts_with('/') || p.starts_with('\\') || (b.len() > 1 && b[1] == b':') {
        Err("must be relative to the workflow's file sandbox (no leading `/`)")
    } else if p.split(['/', '\\']).any(|c| c == "..") {
        Err("must not contain `..`")
    } else if p.contains('\0') {
        Err("must not contain NUL")
    } else {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::definition::{OnError, Trigger};
    use serde_json::json;

    /// A definition that uses every action; see the indices in `errors_point_at_the_problem`.
    pub(crate) fn valid() -> Value {
        json!({
            "id": "w", "version": 1, "projectId": "p",
            "triggers": [
                {"type": "event", "category": "writing", "eventType": "word_added", "filter": [{"path": "data.words", "op": "gte", "value": 100}]},
                {"type": "cron", "schedule": "0 20 * * *", "timeZone": "Europe/Paris"},
                {"type": "manual"}
            ],
            "steps": [
                {"id": "fetch", "action": "http", "input": {"url": "https://example.com/{{ trigger.projectId }}", "method": "GET"}},
                {"id": "check", "action": "condition", "dependsOn": ["fetch"], "input": {"if": "steps.fetch.output.status == 200", "then": ["notify"], "else": ["wait"]}},
                {"id": "notify", "action": "notification", "dependsOn": ["check"], "input": {"userId": "u", "category": "writing", "priority": "high", "title": "{{ steps.fetch.output.body.title }}"}},
                {"id": "wait", "action": "delay", "dependsOn": ["check"], "input": {"duration": "1h"}},
                {"id": "save", "action": "file", "dependsOn": ["fetch"], "input": {"op": "write", "path": "out/{{ trigger.projectId }}.json", "content": "{{ steps.fetch.output.body }}"},
                 "onError": "rollback", "compensate": {"action": "file", "input": {"op": "write", "path": "out/undo.json", "content": "{{ steps.save.output }}"}}},
                {"id": "each", "action": "loop", "dependsOn": ["fetch"], "input": {"over": "steps.fetch.output.body.items", "step": {"action": "redis", "input": {"op": "incr", "key": "seen:{{ item }}"}}, "concurrency": 3}},
                {"id": "mail", "action": "email", "dependsOn": ["each", "save"], "input": {"to": ["a@example.com"], "subject": "done", "text": "{{ steps.each.output | length }} items from {{ steps.fetch.output.status }}"},
                 "retry": {"maxAttempts": 5, "initialInterval": "500ms", "backoffCoefficient": 1.5, "maxInterval": "1m", "jitter": false, "nonRetryable": ["invalid_address"]},
                 "timeout": "2m", "onError": "continue"},
                {"id": "text", "action": "sms", "input": {"to": "+33600000000", "text": "hi"}},
                {"id": "ask", "action": "ai", "input": {"prompt": "Summarise {{ trigger.data }}"}}
            ]
        })
    }

    /// Sets (`Some`) or removes (`None`) the value at a JSON pointer; `/-` appends.
    pub(crate) fn edit(v: &mut Value, ptr: &str, new: Option<Value>) {
        let (parent, last) = ptr.rsplit_once('/').expect("pointer");
        match (v.pointer_mut(parent).expect("parent"), new) {
            (Value::Object(m), Some(n)) => drop(m.insert(last.into(), n)),
            (Value::Object(m), None) => drop(m.remove(last)),
            (Value::Array(a), Some(n)) if last == "-" => a.push(n),
            (Value::Array(a), Some(n)) => a[last.parse::<usize>().expect("index")] = n,
            (Value::Array(a), None) => drop(a.remove(last.parse::<usize>().expect("index"))),
            _ => panic!("not a container: {parent}"),
        }
    }

    #[test]
    fn a_valid_definition_parses_with_defaults() {
        let def = parse_definition(&valid()).expect("valid");
        assert_eq!(def.steps.len(), 9);
        let fetch = &def.steps[0];
        assert_eq!(
            (fetch.retry.max_attempts, fetch.retry.backoff_coefficient),
            (3, 2.0)
        );
        assert_eq!(fetch.retry.max_interval.to_string(), "5m");
        assert_eq!(
            (fetch.timeout.to_string(), fetch.on_error),
            ("30s".into(), OnError::Fail)
        );
        assert_eq!(def.steps[6].retry.initial_interval.as_millis(), 500);
        assert_eq!(def.steps[6].on_error, OnError::Continue);
        assert!(
            matches!(&def.triggers[1], Trigger::Cron { time_zone, .. } if time_zone == "Europe/Paris")
        );
        let mut v = valid();
        edit(&mut v, "/triggers/1/timeZone", None);
        let def = parse_definition(&v).expect("valid");
        assert!(matches!(&def.triggers[1], Trigger::Cron { time_zone, .. } if time_zone == "UTC"));
        // What is serialized parses again to the same definition.
        let again = parse_definition(&serde_json::to_value(&def).expect("json"));
        assert_eq!(again, Ok(def));
    }

    #[test]
    fn errors_point_at_the_problem() {
        let big = "x".repeat(MAX_INPUT_BYTES);
        #[rustfmt::skip]
        let cases: Vec<(&str, Option<Value>, &str, &str)> = vec![
            ("/id", Some(json!("a b")), "/id", "letters, digits"),
            ("/version", Some(json!(0)), "/version", "from 1 to"),
            ("/projectId", None, "/projectId", "required"),
            ("/extra", Some(json!(1)), "/extra", "unknown field"),
            ("/triggers", Some(json!([])), "/triggers", "1 to 20 items"),
            ("/triggers/2/type", Some(json!("webhook")), "/triggers/2/type", "event, cron, manual"),
            ("/triggers/0/category", Some(json!("Writing")), "/triggers/0/category", "lower-case"),
            ("/triggers/0/filter/0/op", Some(json!("like")), "/triggers/0/filter/0/op", "must be one of"),
            ("/triggers/0/filter/0/value", Some(json!("100")), "/triggers/0/filter/0/value", "number"),
            ("/triggers/0/filter/0/path", Some(json!("words")), "/triggers/0/filter/0/path", "data.<field>"),
            ("/triggers/0/filter/-", Some(json!({"path": "projectId", "op": "in", "value": "p"})), "/triggers/0/filter/1/value", "array"),
            ("/triggers/1/schedule", Some(json!("0 20 * *")), "/triggers/1/schedule", "5 or 6 fields"),
            ("/triggers/1/timeZone", Some(json!("Europe/Pariss")), "/triggers/1/timeZone", "IANA"),
            ("/steps", Some(json!([])), "/steps", "1 to 100 items"),
            ("/steps/7/action", Some(json!("ftp")), "/steps/7/action", "unknown action `ftp`"),
            ("/steps/8/id", Some(json!("fetch")), "/steps/8/id", "duplicate step id `fetch` (also /steps/0)"),
            ("/steps/3/dependsOn/0", Some(json!("nope")), "/steps/3/dependsOn/0", "unknown step `nope`"),
            ("/steps/3/dependsOn/-", Some(json!("wait")), "/steps/3/dependsOn/1", "cannot depend on itself"),
            ("/steps/3/dependsOn/-", Some(json!("check")), "/steps/3/dependsOn/1", "listed twice"),
            ("/steps/0/input/url", Some(json!("https://x/{{ trigger.data }")), "/steps/0/input/url", "template does not parse"),
            ("/steps/8/input/prompt", Some(json!("{{ steps.fetch.output }}")), "/steps/8/input/prompt", "`fetch` is not a (transitive) dependency"),
            ("/steps/2/input/body", Some(json!(["{% if steps.save.output %}saved{% endif %}"])), "/steps/2/input/body/0", "`save` is not"),
            ("/steps/1/input/if", Some(json!("steps.each.output")), "/steps/1/input/if", "`each` is not"),
            ("/steps/4/compensate/input/content", Some(json!("{{ steps.mail.output }}")), "/steps/4/compensate/input/content", "`mail` is not"),
            ("/steps/0/input/url", None, "/steps/0/input/url", "required"),
            ("/steps/0/input/url", Some(json!("ftp://x")), "/steps/0/input/url", "http:// or https://"),
            ("/steps/0/input/method", Some(json!("FETCH")), "/steps/0/input/method", "GET, POST"),
            ("/steps/5/input/step/input/op", Some(json!("flushall")), "/steps/5/input/step/input/op", "must be one of"),
            ("/steps/5/input/step/action", Some(json!("loop")), "/steps/5/input/step/action", "not allowed here"),
            ("/steps/5/input/concurrency", Some(json!(0)), "/steps/5/input/concurrency", "from 1 to 100"),
            ("/steps/5/input/over", Some(json!("steps.fetch.output.body.items |")), "/steps/5/input/over", "expression does not parse"),
            ("/steps/6/input/text", None, "/steps/6/input", "needs `text` or `html`"),
            ("/steps/7/input/to", Some(json!(33)), "/steps/7/input/to", "must be a string"),
            ("/steps/2/input/priority", Some(json!("urgent")), "/steps/2/input/priority", "critical, high"),
            ("/steps/2/input/userId", None, "/steps/2/input", "needs `userId` or `userIds`"),
            ("/steps/8/input/prompt", None, "/steps/8/input", "needs `prompt` or `messages`"),
            ("/steps/4/input/path", Some(json!("/etc/passwd")), "/steps/4/input/path", "relative"),
            ("/steps/4/input/path", Some(json!("a/../../b")), "/steps/4/input/path", "`..`"),
            ("/steps/4/input/content", None, "/steps/4/input/content", "required"),
            ("/steps/3/input/duration", Some(json!("31d")), "/steps/3/input/duration", "at most 30d"),
            ("/steps/3/input/duration", Some(json!("soon")), "/steps/3/input/duration", "not a duration"),
            ("/steps/1/input/if", Some(json!("{{ x }}")), "/steps/1/input/if", "without {{ }}"),
            ("/steps/1/input/then", Some(json!(["text"])), "/steps/1/input/then/0", "must list `check` in its dependsOn"),
            ("/steps/1/input/else", Some(json!(["ghost"])), "/steps/1/input/else/0", "unknown step `ghost`"),
            ("/steps/0/retry", Some(json!({"maxAttempts": 21})), "/steps/0/retry/maxAttempts", "from 1 to 20"),
            ("/steps/0/retry", Some(json!({"backoffCoefficient": 0.5})), "/steps/0/retry/backoffCoefficient", "1.0 to 10.0"),
            ("/steps/0/retry", Some(json!({"initialInterval": "2m", "maxInterval": "1m"})), "/steps/0/retry/maxInterval", "less than initialInterval"),
            ("/steps/0/retry", Some(json!({"tries": 2})), "/steps/0/retry/tries", "unknown field"),
            ("/steps/0/timeout", Some(json!("25h")), "/steps/0/timeout", "at most 1d"),
            ("/steps/0/onError", Some(json!("ignore")), "/steps/0/onError", "fail, continue"),
            ("/steps/4/compensate/action", Some(json!("delay")), "/steps/4/compensate/action", "not allowed here"),
            ("/steps/8/input/prompt", Some(json!(big)), "/steps/8/input", "at most 64 KiB"),
        ];
        for (at, value, path, message) in cases {
            let mut v = valid();
            edit(&mut v, at, value.clone());
            let errors = parse_definition(&v).expect_err(at);
            assert!(
                errors
                    .iter()
                    .any(|e| e.path == path && e.message.contains(message)),
                "{at} = {value:?}: expected {path}: …{message}…, got {errors:#?}"
            );
        }
    }

    #[test]
    fn every_error_is_collected_in_document_order() {
        let mut v = valid();
        edit(&mut v, "/version", Some(json!("1")));
        edit(&mut v, "/steps/0/action", Some(json!("gopher")));
        edit(&mut v, "/steps/7/input/text", None);
        edit(&mut v, "/steps/8/dependsOn", Some(json!(["missing"])));
        let paths: Vec<String> = parse_definition(&v)
            .expect_err("invalid")
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(
            paths,
            [
                "/version",
                "/steps/0/action",
                "/steps/7/input/text",
                "/steps/8/dependsOn/0"
            ]
        );
        let errors = parse_definition(&json!([1])).expect_err("not an object");
        assert_eq!(
            errors,
            [DefinitionError {
                path: String::new(),
                message: "must be an object".into()
            }]
        );
    }

    #[test]
    fn cycles_are_reported_with_their_steps() {
        let step = |id: &str, dep: &str| json!({"id": id, "action": "delay", "input": {"duration": "1s"}, "dependsOn": [dep]});
        let mut v = valid();
        edit(
            &mut v,
            "/steps",
            Some(json!([step("a", "b"), step("b", "c"), step("c", "a")])),
        );
        let errors = parse_definition(&v).expect_err("cycle");
        assert_eq!(
            errors,
            [DefinitionError {
                path: "/steps/2/dependsOn/0".into(),
                message: "dependency cycle: a → b → c → a (each step depends on the next)".into()
            }]
        );
    }

    #[test]
    fn limits() {
        let steps: Vec<Value> = (0..=MAX_STEPS)
            .map(|i| json!({"id": format!("s{i}"), "action": "delay", "input": {"duration": "1s"}}))
            .collect();
        let mut v = valid();
        edit(&mut v, "/steps", Some(Value::Array(steps)));
        let errors = parse_definition(&v).expect_err("too many");
        assert_eq!(errors.len(), 1);
        assert_eq!(
            (errors[0].path.as_str(), errors[0].message.as_str()),
            ("/steps", "must have 1 to 100 items")
        );
        let steps: Vec<Value> = (0..MAX_STEPS)
            .map(|i| json!({"id": format!("s{i}"), "action": "ftp", "timeout": "0s"}))
            .collect();
        edit(&mut v, "/steps", Some(Value::Array(steps)));
        let errors = parse_definition(&v).expect_err("broken");
        assert_eq!(errors.len(), MAX_ERRORS + 1);
        assert_eq!(errors[MAX_ERRORS].message, "... and 100 more errors");
    }
}
