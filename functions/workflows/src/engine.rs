//! The engine: runs start, steps are dispatched as durable JetStream messages, workers run
//! them, and a watcher makes sure no run is ever left behind.
//!
//! **A step's life.** When a step is ready it is published to `wf.step.{runId}.{stepId}`
//! (message id `wf:{runId}:{stepId}:{attempt}`, so a repeated dispatch is stored once). A
//! worker takes it from the `WF` stream (the `workflow-steps` consumer; steps of one run
//! run in parallel, one subject per step), claims the attempt with the `START` script (a
//! fresh token and a lease of the step's timeout plus a margin), renders the input, runs the
//! action, and ends the attempt with one script: `FINISH` stores the output and releases the
//! dependants in the same step; `SUSPEND` puts the step back for a retry after its backoff,
//! or parks a delay until it ends. Only then is the message acked, after the released steps
//! were published.
//!
//! **Fencing.** JetStream accepts an ack that arrives after the ack wait (nats-server #4786)
//! and redelivers meanwhile, so a message alone says nothing about who owns a step. The
//! token does: `START` hands it out only to an attempt that is ready, or whose holder's
//! lease ran out, and every later script checks it, so a stalled worker's late result is
//! dropped (`stale`) and cannot complete a step twice or release its dependants twice.
//! An action is repeated only when its worker died (or stalled past its lease) before the
//! result was stored; the HTTP action sends the same `Idempotency-Key` on every attempt for
//! that case.
//!
//! **The watcher** (every `INKWIRE_WORKFLOW_WATCH_INTERVAL`, in every instance, claiming runs
//! from the `inkwire:wf:watch` due queue) looks at each run that is due: a ready step whose
//! backoff ended is dispatched, one ready for longer than the grace (its dispatch was lost in
//! a crash between the script and the publish, or taken by a worker that died) is dispatched
//! again, a delay that ended is dispatched, a running step whose
//! lease ran out is dispatched again (the next `START` takes it over), and a run that ended
//! gets its final event published. So no run stays "running" after a crash: every step is
//! either done or owned by a live attempt, and the run ends when its steps do.
//!
//! **Cancel** marks the run cancelled and every step not started; an attempt running sees
//! it at its next await point (the status is read every 250 ms while an action runs) and
//! stops, its result discarded.
//!
//! Events: `automation.workflow_started` when a run starts, `automation.action_executed` for
//! each step that ends (succeeded, failed, skipped by a condition is not an action),
//! `automation.workflow_completed` / `workflow_failed` when the run ends; their ids derive
//! from the run and step, so a repeat after a crash is stored once. Each step's progress is
//! pushed to `project:{id}` as a `workflow_update` frame.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::Context;
use bytes::Bytes;
use inkwire_shared::channels::{self, Channel, ChannelKind, MessageType};
use inkwire_shared::consumer::{self, ConsumerSpec, Delivery, HandlerError, Shutdown};
use inkwire_shared::due_queue::DueQueue;
use inkwire_shared::events::{Category, Event};
use inkwire_shared::jetstream::{self, Outgoing};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::actions::{self, ActionContext, ActionError, StepScope};
use crate::config::WorkflowsConfig;
use crate::definition::{Action, Definition, OnError, Step, is_identifier};
use crate::store::{self, status, step_status};
use crate::template::{eval_condition, render_input};
use crate::{Dag, registry};

/// The stream of step dispatches.
pub const STREAM: &str = inkwire_shared::subjects::WF_STREAM;
/// Its subjects' prefix: `wf.step.{runId}.{stepId}`.
pub const STEP_PREFIX: &str = "wf.step";
/// The durable consumer that runs steps.
pub const CONSUMER: &str = "workflow-steps";
/// How often a running action checks whether its run was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(250);

pub fn step_subject(run: &str, step: &str) -> String {
    format!("{STEP_PREFIX}.{run}.{step}")
}

/// A dispatch: run this attempt of this step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Dispatch {
    pub run: String,
    pub step: String,
    pub attempt: u32,
    /// When the step became ready (µs since the epoch; 0 from the watcher): for the dispatch
    /// latency figure.
    #[serde(default)]
    pub ready_us: u64,
}

pub fn now_us() -> u64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000) as u64
}

pub fn now_ms() -> u64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

/// A definition with its graph, as the engine keeps it (versions never change: cached).
pub struct Loaded {
    pub definition: Definition,
    pub dag: Dag,
    /// Who registered this version: the user an `http` step with `"auth": "inkwire"` acts
    /// as (with that user's rights at the time of the call).
    pub registered_by: Option<String>,
}

impl Loaded {
    pub fn step(&self, id: &str) -> Option<&Step> {
        self.definition.steps.iter().find(|s| s.id == id)
    }
}

/// Loaded definitions by (id, version).
type DefinitionCache = Arc<Mutex<HashMap<(String, u32), Arc<Loaded>>>>;

/// The engine's shared parts.
#[derive(Clone)]
pub struct Engine {
    pub js: Context,
    pub redis: ConnectionManager,
    pub config: Arc<WorkflowsConfig>,
    pub actions: ActionContext,
    definitions: DefinitionCache,
    /// Step dispatch latencies (ready → handler start, µs) when a bench asks for them.
    pub latencies: Option<Arc<Mutex<Vec<u64>>>>,
}

impl Engine {
    pub fn new(js: Context, redis: ConnectionManager, config: WorkflowsConfig) -> Engine {
        let config = Arc::new(config);
        Engine {
            actions: ActionContext::new(redis.clone(), js.clone(), config.clone()),
            js,
            redis,
            config,
            definitions: Arc::default(),
            latencies: None,
        }
    }

    /// Signs the tokens of `http` steps with `"auth": "inkwire"`.
    pub fn with_jwt(mut self, jwt: Arc<inkwire_shared::auth::JwtKeys>) -> Engine {
        self.actions.jwt = Some(jwt);
        self
    }

    /// A version of a definition (from the cache, or Redis once).
    pub async fn definition(&self, id: &str, version: u32) -> anyhow::Result<Arc<Loaded>> {
        if let Some(d) = self
            .definitions
            .lock()
            .unwrap()
            .get(&(id.to_string(), version))
        {
            return Ok(d.clone());
        }
        let mut redis = self.redis.clone();
        let definition = registry::load(&mut redis, id, version)
            .await?
            .ok_or_else(|| anyhow::anyhow!("workflow {id} version {version} is not registered"))?;
        let dag = Dag::new(&definition).map_err(|e| anyhow::anyhow!(e))?;
        let registered_by = registry::registrant(&mut redis, id, version).await?;
        let loaded = Arc::new(Loaded {
            definition,
            dag,
            registered_by,
        });
        self.definitions
            .lock()
            .unwrap()
            .insert((id.to_string(), version), loaded.clone());
        Ok(loaded)
    }

    async fn dispatch(&self, d: &Dispatch, msg_id: String) -> anyhow::Result<()> {
        jetstream::publish(
            &self.js,
            Outgoing {
                subject: step_subject(&d.run, &d.step),
                msg_id,
                payload: Bytes::from(serde_json::to_vec(d)?),
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("dispatching {}/{}: {e}", d.run, d.step))?;
        Ok(())
    }

    async fn dispatch_ready(
        &self,
        run: &str,
        steps: &[String],
        attempt: u32,
    ) -> anyhow::Result<()> {
        let now = now_us();
        let publishes = steps.iter().map(|s| {
            let d = Dispatch {
                run: run.to_string(),
                step: s.clone(),
                attempt,
                ready_us: now,
            };
            async move {
                self.dispatch(&d, format!("wf:{run}:{}:{attempt}", d.step))
                    .await
            }
        });
        for r in futures::future::join_all(publishes).await {
            r?;
        }
        Ok(())
    }

    async fn publish_event(&self, event: Event) -> anyhow::Result<()> {
        jetstream::publish(
            &self.js,
            Outgoing {
                subject: event.subject(),
                msg_id: event.id.to_string(),
                payload: Bytes::from(serde_json::to_vec(&event)?),
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("automation event not published: {e}"))?;
        Ok(())
    }

    /// Pushes a run's progress to its project's channel (best effort: the run's state is in
    /// Redis; a lost frame is only a late screen).
    async fn push_progress(&self, project: &str, data: Value) {
        let id = format!(
            "wf:{}:{}:{}:{}",
            data["runId"].as_str().unwrap_or(""),
            data["stepId"].as_str().unwrap_or("-"),
            data["status"].as_str().unwrap_or(""),
            data["attempt"].as_u64().unwrap_or(0)
        );
        let channel = Channel::new(ChannelKind::Project, project);
        if let Err(e) =
            channels::publish(&self.js, &channel, MessageType::WorkflowUpdate, &data, id).await
        {
            tracing::debug!(error = %e, "workflow progress not pushed");
        }
    }
}

fn event_id(parts: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("inkwire-wf/{parts}").as_bytes(),
    )
}

/// The suffix of a compensation's pseudo-step (`{stepId}~c`): not an identifier character,
/// so it never collides with a step of the definition.
pub const COMPENSATION: &str = "~c";

/// The step a dispatch names: one of the definition, or the compensation of one (its
/// `compensate` action and input, with the step's retry policy and timeout; a compensation
/// that fails still lets the next one run).
pub fn step_to_run(loaded: &Loaded, id: &str) -> Option<Step> {
    match id.strip_suffix(COMPENSATION) {
        None => loaded.step(id).cloned(),
        Some(base) => {
            let s = loaded.step(base)?;
            let c = s.compensate.as_ref()?;
            Some(Step {
                id: id.to_string(),
                action: c.action,
                input: c.input.clone(),
                depends_on: Vec::new(),
                retry: s.retry.clone(),
                timeout: s.timeout,
                on_error: OnError::Continue,
                compensate: None,
            })
        }
    }
}

/// How a run was started.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// What templates read as `trigger`.
    pub trigger: Value,
    /// Who started it (a user, `service`, or `scheduler`).
    pub started_by: String,
    /// An idempotency key or a triggering event's id: one run per key.
    pub once: Option<String>,
}

/// Starts a run of `loaded`; answers the run id and whether this call created it (false:
/// the key had started it before).
pub async fn start_run(
    engine: &Engine,
    loaded: &Loaded,
    request: StartRequest,
) -> anyhow::Result<(String, bool)> {
    start_planned(engine, loaded, request, None).await
}

/// What a rerun keeps of the run it repeats: the steps that succeeded there (status,
/// output, input, attempts, timings), and the state every other step starts in.
#[derive(Debug, Clone, Default)]
pub struct RerunPlan {
    /// The run it repeats.
    pub of: String,
    /// Each step's starting state: `succeeded` (kept), `skipped` (a kept condition did not
    /// take its branch), `ready` or `pending`.
    pub states: HashMap<String, &'static str>,
    /// The fields copied for the kept steps.
    pub kept: Vec<(String, String)>,
    /// The kept steps in their completion order (for a later rollback).
    pub order: String,
}

/// Plans a rerun of `old` (its run hash) on `loaded` (the same version or a newer one):
/// steps that succeeded keep their outputs; the others run again from where the run
/// stopped. `None` when nothing would run again.
pub fn plan_rerun(
    old_run: &str,
    old: &HashMap<String, String>,
    loaded: &Loaded,
) -> Option<RerunPlan> {
    let mut plan = RerunPlan {
        of: old_run.to_string(),
        ..Default::default()
    };
    let kept =
        |id: &str| old.get(&format!("st:{id}")).map(String::as_str) == Some(step_status::SUCCEEDED);
    for id in loaded.dag.order() {
        let step = loaded.step(id)?;
        let state = if kept(id) {
            for f in ["out", "in", "at", "t0", "t1"] {
                if let Some(v) = old.get(&format!("{f}:{id}")) {
                    plan.kept.push((format!("{f}:{id}"), v.clone()));
                }
            }
            step_status::SUCCEEDED
        } else {
            let deps = &step.depends_on;
            let not_taken = deps.iter().any(|d| {
                let Some(dep) = loaded.step(d) else {
                    return false;
                };
                if dep.action != Action::Condition
                    || plan.states.get(d.as_str()) != Some(&step_status::SUCCEEDED)
                {
                    return false;
                }
                let taken = old
                    .get(&format!("out:{d}"))
                    .and_then(|o| serde_json::from_str::<Value>(o).ok())
                    .and_then(|o| o["branch"].as_str().map(str::to_string))
                    .unwrap_or_default();
                let other = if taken == "then" { "else" } else { "then" };
                dep.input[other]
                    .as_array()
                    .is_some_and(|ids| ids.iter().any(|v| v.as_str() == Some(id)))
            });
            if not_taken
                || deps
                    .iter()
                    .any(|d| plan.states.get(d.as_str()) == Some(&step_status::SKIPPED))
            {
                step_status::SKIPPED
            } else if deps
                .iter()
                .all(|d| plan.states.get(d.as_str()) == Some(&step_status::SUCCEEDED))
            {
                step_status::READY
            } else {
                step_status::PENDING
            }
        };
        plan.states.insert(id.to_string(), state);
    }
    let order: Vec<&str> = old
        .get("order")
        .map(String::as_str)
        .unwrap_or_default()
        .split(',')
        .filter(|id| plan.states.get(*id) == Some(&step_status::SUCCEEDED))
        .collect();
    plan.order = order.join(",");
    plan.states
        .values()
        .any(|s| *s == step_status::READY)
        .then_some(plan)
}

/// Starts a run, from scratch or as a rerun.
pub async fn start_planned(
    engine: &Engine,
    loaded: &Loaded,
    request: StartRequest,
    plan: Option<RerunPlan>,
) -> anyhow::Result<(String, bool)> {
    let run = Uuid::now_v7().simple().to_string();
    let now = now_ms();
    let def = &loaded.definition;
    let left = match &plan {
        None => def.steps.len(),
        Some(p) => p
            .states
            .values()
            .filter(|s| **s == step_status::READY || **s == step_status::PENDING)
            .count(),
    };
    let mut fields: Vec<(String, String)> = vec![
        ("status".into(), status::RUNNING.into()),
        ("wf".into(), def.id.clone()),
        ("ver".into(), def.version.to_string()),
        ("project".into(), def.project_id.clone()),
        ("trigger".into(), request.trigger.to_string()),
        ("by".into(), request.started_by.clone()),
        ("started".into(), now.to_string()),
        ("left".into(), left.to_string()),
    ];
    if let Some(p) = &plan {
        fields.push(("rerunOf".into(), p.of.clone()));
        fields.push(("order".into(), p.order.clone()));
        fields.extend(p.kept.iter().cloned());
    }
    let mut roots = Vec::new();
    for s in &def.steps {
        let id = &s.id;
        let state = match &plan {
            None if s.depends_on.is_empty() => step_status::READY,
            None => step_status::PENDING,
            Some(p) => p.states.get(id).copied().unwrap_or(step_status::PENDING),
        };
        fields.push((format!("st:{id}"), state.into()));
        match state {
            step_status::READY => {
                fields.push((format!("at:{id}"), "1".into()));
                fields.push((format!("rd:{id}"), now.to_string()));
                roots.push(id.clone());
            }
            step_status::SUCCEEDED => {}
            _ => fields.push((format!("at:{id}"), "0".into())),
        }
        fields.push((format!("deps:{id}"), s.depends_on.join(",")));
        fields.push((format!("kids:{id}"), loaded.dag.dependants(id).join(",")));
        if s.compensate.is_some() {
            fields.push((format!("cmp:{id}"), "1".into()));
        }
    }
    let run_key = store::run_key(&run);
    let once_key = match &request.once {
        Some(k) => store::once_key(&def.id, k),
        None => run_key.clone(),
    };
    let mut invocation = store::create_script().prepare_invoke();
    invocation
        .key(&run_key)
        .key(store::watch_key())
        .key(store::runs_key(&def.id))
        .key(&once_key)
        .key(store::stats_key(&def.id))
        .arg(&run)
        .arg(now)
        .arg(now + engine.config.watch_grace.as_millis() as u64)
        .arg(&def.id);
    for (f, v) in &fields {
        invocation.arg(f).arg(v);
    }
    let mut redis = engine.redis.clone();
    let answered: String = invocation.invoke_async(&mut redis).await?;
    if answered != run {
        return Ok((answered, false));
    }
    let started = Event::builder(
        Category::Automation,
        "workflow_started",
        &request.started_by,
    )
    .id(event_id(&format!("{run}/started")))
    .project(&def.project_id)
    .source("workflows")
    .correlation(&run)
    .data(json!({
        "workflowId": def.id,
        "executionId": run,
        "version": def.version,
        "trigger": if plan.is_some() { "rerun" } else { trigger_kind(&request.trigger) },
    }))
    .build();
    // The run exists from here on; the event and the first dispatches are also redone by the
    // watcher if this process stops now (the event id dedupes).
    if let Err(e) = engine.publish_event(started).await {
        tracing::warn!(error = %e, run, "workflow_started not published");
    }
    engine
        .push_progress(
            &def.project_id,
            json!({"kind": "workflow", "runId": run, "workflowId": def.id, "status": "running"}),
        )
        .await;
    if let Err(e) = engine.dispatch_ready(&run, &roots, 1).await {
        tracing::warn!(error = %e, run, "first steps not dispatched; the watcher will");
    }
    Ok((run, true))
}

fn trigger_kind(trigger: &Value) -> &str {
    trigger
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("event")
}

/// The run's hash, read once per step attempt.
async fn read_run(
    redis: &mut ConnectionManager,
    run: &str,
) -> redis::RedisResult<HashMap<String, String>> {
    redis::cmd("HGETALL")
        .arg(store::run_key(run))
        .query_async(redis)
        .await
}

/// `{"trigger", "run", "steps": {id: {status, output, error}}}` for templates.
pub fn template_context(run_id: &str, fields: &HashMap<String, String>) -> Value {
    let parse = |k: &str| {
        fields
            .get(k)
            .and_then(|v| serde_json::from_str::<Value>(v).ok())
            .unwrap_or(Value::Null)
    };
    let mut steps = Map::new();
    for (k, v) in fields {
        if let Some(id) = k.strip_prefix("st:") {
            steps.insert(
                id.to_string(),
                json!({
                    "status": v,
                    "output": parse(&format!("out:{id}")),
                    "error": parse(&format!("err:{id}")),
                }),
            );
        }
    }
    json!({
        "trigger": parse("trigger"),
        "run": {"id": run_id, "workflowId": fields.get("wf"), "projectId": fields.get("project")},
        "steps": steps,
    })
}

/// The wait before attempt `next` (2, 3, ...) of a step: exponential, capped, with up to half
/// taken off at random when `jitter` is on.
pub fn backoff(step: &Step, next: u32) -> Duration {
    let r = &step.retry;
    let base = r.initial_interval.0.as_secs_f64()
        * r.backoff_coefficient.powi(next.saturating_sub(2) as i32);
    let capped = base.min(r.max_interval.0.as_secs_f64()).max(0.0);
    let d = Duration::from_secs_f64(capped);
    if r.jitter {
        let unit = (Uuid::new_v4().as_u128() % 1_000_000) as f64 / 1_000_000.0;
        d - d.mul_f64(unit / 2.0)
    } else {
        d
    }
}

/// What one attempt produced.
enum Outcome {
    Succeeded {
        output: Value,
        skip: Vec<String>,
    },
    Failed(ActionError),
    /// A delay that has not ended yet: park until `until`.
    Wait {
        until: u64,
    },
    /// The run was cancelled (or ended) while the action ran: nothing to store.
    Abandoned,
}

/// Fault injection for the crash tests: with `INKWIRE_WORKFLOW_CRASH_AT` set to `received`,
/// `started`, `acted`, `finished` or `dispatched`, the process aborts (no unwinding, no
/// cleanup: as a SIGKILL would leave things) the first time a step reaches that point. Unset
/// in every real deployment; read once.
fn crash_point(phase: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("INKWIRE_WORKFLOW_CRASH_AT").ok())
        .as_deref()
        == Some(phase)
    {
        eprintln!("INKWIRE_WORKFLOW_CRASH_AT={phase}: aborting");
        std::process::abort();
    }
}

/// Handles one dispatch (the consumer's handler).
pub async fn handle(engine: &Engine, delivery: Delivery) -> Result<(), HandlerError> {
    crash_point("received");
    let d: Dispatch = serde_json::from_slice(&delivery.payload)
        .map_err(|e| HandlerError::Permanent(format!("not a step dispatch: {e}")))?;
    let base_step = d.step.strip_suffix(COMPENSATION).unwrap_or(&d.step);
    if !is_identifier(&d.run) || !is_identifier(base_step) || d.attempt == 0 {
        return Err(HandlerError::Permanent(
            "a step dispatch with bad ids".into(),
        ));
    }
    let retry = |e: String| HandlerError::Retry(e);
    let mut redis = engine.redis.clone();
    let fields = read_run(&mut redis, &d.run)
        .await
        .map_err(|e| retry(e.to_string()))?;
    let (Some(wf), Some(ver), Some(project)) = (
        fields.get("wf"),
        fields.get("ver").and_then(|v| v.parse::<u32>().ok()),
        fields.get("project").cloned(),
    ) else {
        return Ok(()); // a run that no longer exists
    };
    let loaded = engine
        .definition(wf, ver)
        .await
        .map_err(|e| retry(e.to_string()))?;
    let Some(step) = step_to_run(&loaded, &d.step) else {
        return Err(HandlerError::Permanent(format!(
            "no step {} in {wf} v{ver}",
            d.step
        )));
    };
    let step = &step;
    let token = Uuid::new_v4().simple().to_string();
    let now = now_ms();
    let lease_until =
        now + step.timeout.as_millis() + engine.config.lease_margin.as_millis() as u64;
    let (verdict, from): (String, String) = store::start_script()
        .key(store::run_key(&d.run))
        .arg(&d.step)
        .arg(d.attempt)
        .arg(&token)
        .arg(now)
        .arg(lease_until)
        .invoke_async(&mut redis)
        .await
        .map_err(|e| retry(e.to_string()))?;
    if verdict == "ok" {
        crash_point("started");
    }
    if verdict != "ok" {
        tracing::debug!(
            run = d.run,
            step = d.step,
            verdict,
            from,
            "dispatch dropped"
        );
        return Ok(());
    }
    if let (Some(lat), true) = (&engine.latencies, d.ready_us > 0 && d.attempt == 1) {
        lat.lock()
            .unwrap()
            .push(now_us().saturating_sub(d.ready_us));
    }
    // Later fields (other steps' outputs) were read before START: fine, a step reads only its
    // ancestors, which finished before it was released.
    let context = template_context(&d.run, &fields);
    let started = now_ms();
    let mut rendered = Value::Null;
    let outcome = match render_step_input(step, &context) {
        Err(e) => Outcome::Failed(ActionError::permanent("template_error", e.to_string())),
        Ok(input) => {
            rendered = input.clone();
            let scope = RunScope {
                project: &project,
                acting: loaded.registered_by.as_deref(),
            };
            run_step(
                engine,
                &d,
                step,
                &scope,
                &input,
                from == step_status::WAITING,
                &fields,
            )
            .await
        }
    };
    let elapsed = now_ms().saturating_sub(started);
    crash_point("acted");
    finish(
        engine, &loaded, &d, step, &project, &token, outcome, rendered, elapsed,
    )
    .await
    .map_err(|e| retry(e.to_string()))?;
    crash_point("dispatched");
    Ok(())
}

/// Runs the step's action under its timeout, watching for a cancel.
/// Whose run a step is part of: its project, and the user `"auth": "inkwire"` acts as.
struct RunScope<'a> {
    project: &'a str,
    acting: Option<&'a str>,
}

async fn run_step(
    engine: &Engine,
    d: &Dispatch,
    step: &Step,
    scope: &RunScope<'_>,
    input: &Value,
    resumed: bool,
    fields: &HashMap<String, String>,
) -> Outcome {
    match step.action {
        Action::Condition => {
            let expr = input.get("if").and_then(Value::as_str).unwrap_or("false");
            let context = template_context(&d.run, fields);
            match eval_condition(expr, &context) {
                Ok(result) => {
                    let not_taken = if result { "else" } else { "then" };
                    let skip = step.input[not_taken]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    Outcome::Succeeded {
                        output: json!({"result": result, "branch": if result { "then" } else { "else" }}),
                        skip,
                    }
                }
                Err(e) => Outcome::Failed(ActionError::permanent("template_error", e.to_string())),
            }
        }
        Action::Delay => {
            if resumed {
                return Outcome::Succeeded {
                    output: json!({"waitedUntil": fields.get(&format!("wu:{}", d.step)).and_then(|v| v.parse::<u64>().ok()).map(rfc3339)}),
                    skip: Vec::new(),
                };
            }
            match delay_until(input) {
                Ok(until) if until <= now_ms() => Outcome::Succeeded {
                    output: json!({"waitedUntil": rfc3339(until)}),
                    skip: Vec::new(),
                },
                Ok(until) => Outcome::Wait { until },
                Err(e) => Outcome::Failed(e),
            }
        }
        Action::Loop => match run_loop(engine, d, scope, input, fields).await {
            Ok(output) => Outcome::Succeeded {
                output,
                skip: Vec::new(),
            },
            Err(e) => Outcome::Failed(e),
        },
        action => {
            let key = format!("{}:{}", d.run, d.step);
            let scope = StepScope {
                project: scope.project,
                idempotency_key: &key,
                acting_user: scope.acting,
            };
            let work = actions::run(&engine.actions, action, &scope, input);
            let timeout = tokio::time::sleep(step.timeout.0);
            let expected = if d.step.ends_with(COMPENSATION) {
                status::ROLLING_BACK
            } else {
                status::RUNNING
            };
            let cancelled = watch_cancel(engine.redis.clone(), &d.run, expected);
            tokio::select! {
                r = work => match r {
                    Ok(output) => Outcome::Succeeded { output, skip: Vec::new() },
                    Err(e) => Outcome::Failed(e),
                },
                _ = timeout => Outcome::Failed(ActionError::transient(
                    "timeout",
                    format!("no result within {}", step.timeout),
                )),
                _ = cancelled => Outcome::Abandoned,
            }
        }
    }
}

/// Renders a step's input. A loop's `step` is left as it is (its templates read `item` and
/// `index`, rendered per iteration), and its `over` may be an expression.
fn render_step_input(step: &Step, context: &Value) -> Result<Value, crate::RenderError> {
    if step.action != Action::Loop {
        return render_input(&step.input, context);
    }
    let mut outer = step.input.clone();
    let inner = outer.as_object_mut().and_then(|o| o.remove("step"));
    let mut rendered = render_input(&outer, context)?;
    if let Some(Value::String(expr)) = step.input.get("over")
        && !crate::template::is_template(expr)
    {
        rendered["over"] = crate::template::eval_expression(expr, context)?;
    }
    if let Some(inner) = inner {
        rendered["step"] = inner;
    }
    Ok(rendered)
}

/// Most items one loop runs.
pub const MAX_LOOP_ITEMS: usize = 1_000;

/// A loop: the inner action once per item, at most `concurrency` at once. Each iteration's
/// output is stored in the run (`li:{step}:{index}`) as it finishes, so an attempt after a
/// crash or a failure runs only the iterations not done; each iteration has its own
/// idempotency key (`{runId}:{stepId}:{index}`).
async fn run_loop(
    engine: &Engine,
    d: &Dispatch,
    scope: &RunScope<'_>,
    input: &Value,
    fields: &HashMap<String, String>,
) -> Result<Value, ActionError> {
    use futures::StreamExt;
    let Some(items) = input["over"].as_array() else {
        return Err(ActionError::permanent("invalid_input", "over: not a list"));
    };
    if items.len() > MAX_LOOP_ITEMS {
        return Err(ActionError::permanent(
            "invalid_input",
            format!("over: {} items (at most {MAX_LOOP_ITEMS})", items.len()),
        ));
    }
    let inner = &input["step"];
    let action = inner["action"]
        .as_str()
        .and_then(Action::from_name)
        .filter(|a| !matches!(a, Action::Delay | Action::Condition | Action::Loop))
        .ok_or_else(|| {
            ActionError::permanent("invalid_input", "step.action: an action with an effect")
        })?;
    let concurrency = input["concurrency"].as_u64().unwrap_or(1).clamp(1, 100) as usize;
    let context = template_context(&d.run, fields);
    let iterations: Vec<_> = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let mut ctx = context.clone();
            ctx["item"] = item.clone();
            ctx["index"] = json!(i);
            loop_iteration(
                engine.clone(),
                d.run.clone(),
                d.step.clone(),
                scope.project.to_string(),
                scope.acting.map(str::to_string),
                action,
                inner["input"].clone(),
                ctx,
                i,
                fields.get(&format!("li:{}:{i}", d.step)).cloned(),
            )
        })
        .collect();
    let results: Vec<Result<Value, ActionError>> = futures::stream::iter(iterations)
        .buffered(concurrency)
        .collect()
        .await;
    let mut outputs = Vec::with_capacity(results.len());
    for r in results {
        outputs.push(r?);
    }
    Ok(json!({"count": outputs.len(), "items": outputs}))
}

/// One iteration of a loop (owned arguments: the futures run together in a stream).
#[allow(clippy::too_many_arguments)]
async fn loop_iteration(
    engine: Engine,
    run: String,
    step: String,
    project: String,
    acting: Option<String>,
    action: Action,
    input: Value,
    ctx: Value,
    i: usize,
    done: Option<String>,
) -> Result<Value, ActionError> {
    if let Some(done) = done {
        return Ok(serde_json::from_str(&done).unwrap_or(Value::Null));
    }
    let input = render_input(&input, &ctx)
        .map_err(|e| ActionError::permanent("template_error", format!("item {i}: {e}")))?;
    let key = format!("{run}:{step}:{i}");
    let scope = StepScope {
        project: &project,
        idempotency_key: &key,
        acting_user: acting.as_deref(),
    };
    let output = actions::run(&engine.actions, action, &scope, &input).await?;
    let mut redis = engine.redis.clone();
    redis::cmd("HSET")
        .arg(store::run_key(&run))
        .arg(format!("li:{step}:{i}"))
        .arg(output.to_string())
        .query_async::<()>(&mut redis)
        .await
        .map_err(|e| ActionError::transient("redis_unavailable", e.to_string()))?;
    Ok(output)
}

/// Resolves when the run's status is no longer `expected` (cancelled, or failed or rolling
/// back because of another branch).
async fn watch_cancel(mut redis: ConnectionManager, run: &str, expected: &str) {
    let key = store::run_key(run);
    loop {
        tokio::time::sleep(CANCEL_POLL).await;
        let s: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("status")
            .query_async(&mut redis)
            .await
            .unwrap_or(Some(expected.into()));
        if s.as_deref() != Some(expected) {
            return;
        }
    }
}

fn delay_until(input: &Value) -> Result<u64, ActionError> {
    if let Some(d) = input.get("duration") {
        let text = d.as_str().unwrap_or_default();
        let d = crate::definition::parse_duration(text)
            .map_err(|e| ActionError::permanent("invalid_input", format!("duration: {e}")))?;
        return Ok(now_ms() + d.as_millis());
    }
    let text = input
        .get("until")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| ActionError::permanent("invalid_input", "until: not an RFC 3339 time"))?;
    Ok((at.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
}

pub fn rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Puts a running attempt's step back: `ready` for attempt `attempt` at `at` (a retry), or
/// `waiting` until `at` (a delay).
#[allow(clippy::too_many_arguments)]
async fn suspend(
    engine: &Engine,
    d: &Dispatch,
    token: &str,
    state: &str,
    attempt: u32,
    at: u64,
    error: &str,
    log: &Value,
) -> anyhow::Result<()> {
    let mut redis = engine.redis.clone();
    let _: String = store::suspend_script()
        .key(store::run_key(&d.run))
        .key(store::watch_key())
        .key(store::watch_lease_key(&d.run))
        .arg(&d.step)
        .arg(token)
        .arg(state)
        .arg(attempt)
        .arg(at)
        .arg(error)
        .arg(&d.run)
        .arg(log.to_string())
        .invoke_async(&mut redis)
        .await?;
    Ok(())
}

/// Stores an attempt's outcome, then publishes what follows from it.
#[allow(clippy::too_many_arguments)]
async fn finish(
    engine: &Engine,
    loaded: &Loaded,
    d: &Dispatch,
    step: &Step,
    project: &str,
    token: &str,
    outcome: Outcome,
    rendered: Value,
    elapsed_ms: u64,
) -> anyhow::Result<()> {
    let now = now_ms();
    // The attempt's record in the step's log.
    let log = |outcome: &str, error: Option<&Value>| {
        json!({
            "attempt": d.attempt,
            "startedAt": rfc3339(now.saturating_sub(elapsed_ms)),
            "endedAt": rfc3339(now),
            "durationMs": elapsed_ms,
            "outcome": outcome,
            "error": error,
        })
    };
    let (succeeded, output, error, skip) = match outcome {
        Outcome::Abandoned => return Ok(()),
        Outcome::Wait { until } => {
            let entry = log("waiting", None);
            suspend(
                engine,
                d,
                token,
                step_status::WAITING,
                d.attempt,
                until,
                "",
                &entry,
            )
            .await?;
            engine
                .push_progress(project, json!({"kind": "step", "runId": d.run, "stepId": d.step, "status": "waiting", "attempt": d.attempt, "until": rfc3339(until)}))
                .await;
            return Ok(());
        }
        Outcome::Succeeded { output, skip } => (true, output, None, skip),
        Outcome::Failed(e) => {
            let retryable = e.retryable
                && d.attempt < step.retry.max_attempts
                && !step
                    .retry
                    .non_retryable
                    .iter()
                    .any(|c| *c == e.code || e.message.contains(c.as_str()));
            let mut err = e.to_json();
            err["attempt"] = json!(d.attempt);
            if retryable {
                let next = d.attempt + 1;
                let at = now + backoff(step, next).as_millis() as u64;
                let entry = log("retrying", Some(&err));
                suspend(
                    engine,
                    d,
                    token,
                    step_status::READY,
                    next,
                    at,
                    &err.to_string(),
                    &entry,
                )
                .await?;
                engine
                    .push_progress(project, json!({"kind": "step", "runId": d.run, "stepId": d.step, "status": "retrying", "attempt": d.attempt, "error": err, "nextAttemptAt": rfc3339(at)}))
                    .await;
                return Ok(());
            }
            (false, Value::Null, Some(err), Vec::new())
        }
    };
    let strategy = match step.on_error {
        OnError::Continue => "continue",
        OnError::Rollback => "rollback",
        OnError::Fail | OnError::Retry => "fail",
    };
    // The step's `action_executed` event, kept in the run until it is published (a crash
    // between the script and the publish leaves it for the watcher).
    let ev = if step.action == Action::Condition {
        String::new()
    } else {
        format!(
            "{}|{}|{elapsed_ms}",
            d.attempt,
            if succeeded { "succeeded" } else { "failed" }
        )
    };
    let mut invocation = store::finish_script().prepare_invoke();
    invocation
        .key(store::run_key(&d.run))
        .key(store::watch_key())
        .key(store::watch_lease_key(&d.run))
        .arg(&d.step)
        .arg(token)
        .arg(if succeeded {
            step_status::SUCCEEDED
        } else {
            step_status::FAILED
        })
        .arg(strategy)
        .arg(now)
        .arg(now + engine.config.watch_grace.as_millis() as u64)
        .arg(if succeeded {
            output.to_string()
        } else {
            String::new()
        })
        .arg(error.as_ref().map(Value::to_string).unwrap_or_default())
        .arg(if rendered.is_null() {
            String::new()
        } else {
            rendered.to_string()
        })
        .arg(&d.run)
        .arg(&ev)
        .arg(
            log(
                if succeeded { "succeeded" } else { "failed" },
                error.as_ref(),
            )
            .to_string(),
        );
    for s in &skip {
        invocation.arg(s);
    }
    let mut redis = engine.redis.clone();
    let answer: Vec<String> = invocation.invoke_async(&mut redis).await?;
    let Some((run_status, ready)) = answer.split_first() else {
        return Ok(());
    };
    if run_status == "stale" {
        return Ok(());
    }
    crash_point("finished");
    let status_text = if succeeded { "succeeded" } else { "failed" };
    // The released steps, the step's event and its progress frame are independent: sent
    // together, so the attempt is over after one publish round trip instead of three. All
    // before the run's final event (`run_ended`), which must come after the last step's.
    let progress = json!({"kind": "step", "runId": d.run, "stepId": d.step, "status": status_text, "attempt": d.attempt, "output": output, "error": error});
    let (dispatched, evented, ()) = futures::join!(
        engine.dispatch_ready(&d.run, ready, 1),
        async {
            if step.action == Action::Condition {
                return Ok(());
            }
            publish_action_event(engine, &loaded.definition, &d.run, &d.step, &ev).await
        },
        engine.push_progress(project, progress),
    );
    dispatched?;
    evented?;
    if status::is_terminal(run_status) {
        if run_status == status::FAILED && !succeeded && step.on_error == OnError::Retry {
            schedule_auto_rerun(engine, &d.run, step).await?;
        }
        run_ended(engine, &d.run).await?;
    }
    Ok(())
}

/// Publishes a step's `action_executed` event from its `ev:{step}` field
/// (`attempt|status|durationMs`; the id derives from the run, step and attempt, so a repeat
/// is stored once), then clears the field.
async fn publish_action_event(
    engine: &Engine,
    definition: &Definition,
    run: &str,
    step: &str,
    ev: &str,
) -> anyhow::Result<()> {
    let mut parts = ev.split('|');
    let (Some(attempt), Some(status), Some(duration)) = (
        parts.next().and_then(|a| a.parse::<u32>().ok()),
        parts.next(),
        parts.next().and_then(|d| d.parse::<u64>().ok()),
    ) else {
        return Ok(());
    };
    // A compensation is reported under its step's id, with the action it ran.
    let (action_id, action) = match step.strip_suffix(COMPENSATION) {
        None => (
            step,
            definition
                .steps
                .iter()
                .find(|s| s.id == step)
                .map(|s| s.action.name().to_string())
                .unwrap_or_else(|| "unknown".into()),
        ),
        Some(base) => (
            base,
            definition
                .steps
                .iter()
                .find(|s| s.id == base)
                .and_then(|s| s.compensate.as_ref())
                .map(|c| format!("compensation:{}", c.action.name()))
                .unwrap_or_else(|| "compensation".into()),
        ),
    };
    let event = Event::builder(Category::Automation, "action_executed", "workflows")
        .id(event_id(&format!("{run}/{step}/{attempt}")))
        .project(&definition.project_id)
        .source("workflows")
        .correlation(run)
        .data(json!({
            "workflowId": definition.id,
            "executionId": run,
            "actionId": action_id,
            "actionType": action,
            "status": status,
            "durationMs": duration,
            "attempt": attempt,
        }))
        .build();
    engine.publish_event(event).await?;
    let mut redis = engine.redis.clone();
    // Counted by whoever clears the field, so a repeat after a crash counts once.
    let _: i64 = store::counted_script()
        .key(store::run_key(run))
        .key(store::stats_key(&definition.id))
        .arg(format!("ev:{step}"))
        .arg(if status == "succeeded" {
            "stepsSucceeded"
        } else {
            "stepsFailed"
        })
        .arg(0)
        .invoke_async(&mut redis)
        .await?;
    Ok(())
}

/// Publishes the `action_executed` events a crash left in the run's hash.
async fn flush_action_events(
    engine: &Engine,
    run: &str,
    fields: &HashMap<String, String>,
) -> anyhow::Result<()> {
    let pending: Vec<(&str, &String)> = fields
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("ev:").map(|s| (s, v)))
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    let (Some(wf), Some(ver)) = (
        fields.get("wf"),
        fields.get("ver").and_then(|v| v.parse::<u32>().ok()),
    ) else {
        return Ok(());
    };
    let loaded = engine.definition(wf, ver).await?;
    for (step, ev) in pending {
        publish_action_event(engine, &loaded.definition, run, step, ev).await?;
    }
    Ok(())
}

/// Publishes a run's final event (once: the id derives from the run) and its last frame.
pub async fn run_ended(engine: &Engine, run: &str) -> anyhow::Result<()> {
    let mut redis = engine.redis.clone();
    let fields = read_run(&mut redis, run).await?;
    let run_status = fields.get("status").map(String::as_str).unwrap_or_default();
    if !status::is_terminal(run_status) {
        return Ok(());
    }
    // The steps' events before the run's (also when only they were left by a crash).
    flush_action_events(engine, run, &fields).await?;
    if fields.contains_key("announced") {
        return Ok(());
    }
    let project = fields.get("project").cloned().unwrap_or_default();
    let wf = fields.get("wf").cloned().unwrap_or_default();
    let num = |k: &str| {
        fields
            .get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let duration = num("ended").saturating_sub(num("started"));
    let (event_type, mut data) = match run_status {
        status::COMPLETED => (
            "workflow_completed",
            json!({"workflowId": wf, "executionId": run, "durationMs": duration}),
        ),
        _ => {
            let error = fields
                .get("error")
                .and_then(|e| serde_json::from_str::<Value>(e).ok())
                .and_then(|e| e.get("message").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| run_status.to_string());
            let failed_step = fields
                .iter()
                .find(|(k, v)| k.starts_with("st:") && v.as_str() == step_status::FAILED)
                .map(|(k, _)| k[3..].to_string());
            let mut d = json!({"workflowId": wf, "executionId": run, "error": inkwire_shared::problem::clip(&error, 500)});
            if let Some(s) = failed_step {
                d["failedActionId"] = json!(s);
            }
            ("workflow_failed", d)
        }
    };
    if run_status == status::CANCELLED {
        data["error"] = json!("cancelled");
    }
    let event = Event::builder(Category::Automation, event_type, "workflows")
        .id(event_id(&format!("{run}/ended")))
        .project(&project)
        .source("workflows")
        .correlation(run)
        .data(data)
        .build();
    engine.publish_event(event).await?;
    let _: i64 = store::announced_script()
        .key(store::run_key(run))
        .key(store::stats_key(&wf))
        .arg(now_ms())
        .arg(run_status)
        .arg(if run_status == status::COMPLETED {
            duration
        } else {
            0
        })
        .invoke_async(&mut redis)
        .await?;
    engine
        .push_progress(
            &project,
            json!({"kind": "workflow", "runId": run, "workflowId": wf, "status": run_status}),
        )
        .await;
    Ok(())
}

/// The consumer settings of the step workers.
pub fn consumer_spec() -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(STREAM, CONSUMER).filter(format!("{STEP_PREFIX}.>"));
    spec.batch = 64;
    spec.max_deliver = 20;
    spec.max_ack_pending = Some(4_096);
    spec
}

/// Runs step workers, the watcher, the cron scheduler and the event triggers until
/// `shutdown`.
pub async fn run_worker(engine: Engine, shutdown: Shutdown) -> anyhow::Result<()> {
    let watcher = tokio::spawn(run_watcher(engine.clone(), shutdown.clone()));
    let cron = tokio::spawn(crate::triggers::run_cron(engine.clone(), shutdown.clone()));
    let events = tokio::spawn(crate::triggers::run_event_triggers(
        engine.clone(),
        shutdown.clone(),
    ));
    let concurrency = engine.config.concurrency;
    let e = engine.clone();
    let stats = consumer::run_concurrent(
        engine.js.clone(),
        consumer_spec(),
        move |delivery| {
            let e = e.clone();
            async move { handle(&e, delivery).await }
        },
        concurrency,
        shutdown,
    )
    .await?;
    tracing::info!(?stats, "workflow step worker stopped");
    let _ = watcher.await;
    let _ = cron.await;
    match events.await {
        Ok(Err(e)) => tracing::error!(error = %e, "workflow event triggers stopped"),
        Err(e) => tracing::error!(error = %e, "workflow event triggers panicked"),
        Ok(Ok(())) => {}
    }
    Ok(())
}

/// The watcher loop (module doc).
pub async fn run_watcher(engine: Engine, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let queue = DueQueue::new(store::watch_key());
    let mut ticker = tokio::time::interval(engine.config.watch_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait() => return Ok(()),
        }
        if let Err(e) = watch_once(&engine, &queue).await {
            tracing::warn!(error = %e, "workflow watcher tick failed");
        }
    }
}

/// One pass: claims the runs that are due and looks at each.
pub async fn watch_once(engine: &Engine, queue: &DueQueue) -> anyhow::Result<usize> {
    let mut redis = engine.redis.clone();
    let now = now_ms();
    let claimed = queue.claim(&mut redis, now, 200, 30_000).await?;
    let n = claimed.len();
    for l in claimed {
        if !is_identifier(&l.member) {
            queue.cancel(&mut redis, &l.member).await?;
            continue;
        }
        if let Err(e) = look_at(engine, queue, &l).await {
            tracing::warn!(error = %e, run = l.member, "workflow watcher: run not examined");
        }
    }
    Ok(n)
}

async fn look_at(
    engine: &Engine,
    queue: &DueQueue,
    lease: &inkwire_shared::due_queue::Lease,
) -> anyhow::Result<()> {
    let run = &lease.member;
    let mut redis = engine.redis.clone();
    let fields = read_run(&mut redis, run).await?;
    let run_status = fields.get("status").cloned().unwrap_or_default();
    if run_status.is_empty() {
        queue.done(&mut redis, lease).await?;
        return Ok(());
    }
    if status::is_terminal(&run_status) {
        run_ended(engine, run).await?;
        queue.done(&mut redis, lease).await?;
        return Ok(());
    }
    flush_action_events(engine, run, &fields).await?;
    let now = now_ms();
    let grace = engine.config.watch_grace.as_millis() as u64;
    let mut next = now + grace;
    let num = |k: String| {
        fields
            .get(&k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    for (k, st) in &fields {
        let Some(step) = k.strip_prefix("st:") else {
            continue;
        };
        let attempt = num(format!("at:{step}")) as u32;
        let d = Dispatch {
            run: run.clone(),
            step: step.to_string(),
            attempt,
            ready_us: 0,
        };
        match st.as_str() {
            step_status::READY => {
                let rd = num(format!("rd:{step}"));
                if rd > now {
                    next = next.min(rd);
                } else if now < rd + grace {
                    // Due (a retry's backoff ended), or just released: the fast path's id, so
                    // a dispatch that was stored is not stored again.
                    engine
                        .dispatch(&d, format!("wf:{run}:{step}:{attempt}"))
                        .await?;
                    next = next.min(rd + grace);
                } else {
                    // Ready for longer than the grace: its dispatch was lost, or went to a
                    // worker that died holding it (JetStream would redeliver only after the
                    // ack wait). A new id, so that it is stored; a duplicate is dropped by
                    // the fencing.
                    engine
                        .dispatch(&d, format!("wf:{run}:{step}:{attempt}:r{now}"))
                        .await?;
                }
            }
            step_status::WAITING => {
                let wu = num(format!("wu:{step}"));
                if wu <= now {
                    engine
                        .dispatch(&d, format!("wf:{run}:{step}:{attempt}:w{now}"))
                        .await?;
                } else {
                    next = next.min(wu);
                }
            }
            step_status::RUNNING => {
                let ls = num(format!("ls:{step}"));
                if ls < now {
                    engine
                        .dispatch(&d, format!("wf:{run}:{step}:{attempt}:l{now}"))
                        .await?;
                } else {
                    next = next.min(ls + 1);
                }
            }
            _ => {}
        }
    }
    let _: i64 = store::reschedule_script()
        .key(store::watch_key())
        .key(store::watch_lease_key(run))
        .arg(run)
        .arg(&lease.token)
        .arg(next.max(now + 1))
        .invoke_async(&mut redis)
        .await?;
    Ok(())
}

/// Cancels a run (running the completed steps' compensations first when `compensate`);
/// answers the run's status before (`running` when this call cancelled it).
pub async fn cancel(
    engine: &Engine,
    run: &str,
    by: &str,
    compensate: bool,
) -> anyhow::Result<String> {
    let mut redis = engine.redis.clone();
    let answer: Vec<String> = store::cancel_script()
        .key(store::run_key(run))
        .key(store::watch_key())
        .key(store::watch_lease_key(run))
        .arg(now_ms())
        .arg(json!({"code": "cancelled", "message": format!("cancelled by {by}")}).to_string())
        .arg(run)
        .arg(if compensate { "1" } else { "0" })
        .invoke_async(&mut redis)
        .await?;
    match answer.as_slice() {
        [ok, first] if ok == "ok" => {
            if first.is_empty() {
                run_ended(engine, run).await?;
            } else {
                engine
                    .dispatch_ready(run, std::slice::from_ref(first), 1)
                    .await?;
            }
            Ok(status::RUNNING.into())
        }
        [other, ..] => Ok(other.clone()),
        [] => Ok("missing".into()),
    }
}

/// Why a run cannot be rerun.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RerunRefused {
    Missing,
    /// Only failed and cancelled runs are rerun (the status says what it is).
    NotEnded(String),
    /// Every step succeeded or was skipped: nothing would run again.
    NothingToRerun,
    /// The asked version is not registered.
    NoVersion(u32),
}

/// Reruns a failed or cancelled run from where it stopped, on its version or `version`;
/// answers the new run's id.
pub async fn rerun(
    engine: &Engine,
    old_run: &str,
    version: Option<u32>,
    started_by: &str,
    auto: u32,
) -> anyhow::Result<Result<(String, u32), RerunRefused>> {
    let mut redis = engine.redis.clone();
    let old = read_run(&mut redis, old_run).await?;
    let (Some(wf), Some(ver), Some(st)) = (
        old.get("wf"),
        old.get("ver").and_then(|v| v.parse::<u32>().ok()),
        old.get("status"),
    ) else {
        return Ok(Err(RerunRefused::Missing));
    };
    if st != status::FAILED && st != status::CANCELLED {
        return Ok(Err(RerunRefused::NotEnded(st.clone())));
    }
    let version = version.unwrap_or(ver);
    if registry::load(&mut redis, wf, version).await?.is_none() {
        return Ok(Err(RerunRefused::NoVersion(version)));
    }
    let loaded = engine.definition(wf, version).await?;
    let Some(plan) = plan_rerun(old_run, &old, &loaded) else {
        return Ok(Err(RerunRefused::NothingToRerun));
    };
    let trigger = old
        .get("trigger")
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .unwrap_or(Value::Null);
    let once = (auto > 0).then(|| format!("auto-{old_run}"));
    let (run, _) = start_planned(
        engine,
        &loaded,
        StartRequest {
            trigger,
            started_by: started_by.to_string(),
            once,
        },
        Some(plan),
    )
    .await?;
    if auto > 0 {
        redis::cmd("HSET")
            .arg(store::run_key(&run))
            .arg("auto")
            .arg(auto)
            .query_async::<()>(&mut redis)
            .await?;
    }
    Ok(Ok((run, version)))
}

/// Automatic reruns (`onError: retry`) at most this many times in a row.
pub const MAX_AUTO_RERUNS: u32 = 3;

/// The due queue of automatic reruns (member: the failed run).
pub fn reruns_key() -> String {
    format!("{}:reruns", store::PREFIX)
}

/// Schedules the automatic rerun of a run that failed at an `onError: retry` step, after
/// the step's `maxInterval` (at most an hour), unless it is itself the last allowed rerun.
async fn schedule_auto_rerun(engine: &Engine, run: &str, step: &Step) -> anyhow::Result<()> {
    let mut redis = engine.redis.clone();
    let auto: Option<u32> = redis::cmd("HGET")
        .arg(store::run_key(run))
        .arg("auto")
        .query_async(&mut redis)
        .await?;
    if auto.unwrap_or(0) >= MAX_AUTO_RERUNS {
        return Ok(());
    }
    let wait = step.retry.max_interval.as_millis().min(3_600_000);
    DueQueue::new(reruns_key())
        .schedule(&mut redis, run, now_ms() + wait)
        .await?;
    Ok(())
}

/// Starts the automatic reruns that are due (one pass of the cron loop).
pub async fn fire_reruns(engine: &Engine) -> anyhow::Result<()> {
    let queue = DueQueue::new(reruns_key());
    let mut redis = engine.redis.clone();
    for lease in queue.claim(&mut redis, now_ms(), 50, 60_000).await? {
        if is_identifier(&lease.member) {
            let auto: Option<u32> = redis::cmd("HGET")
                .arg(store::run_key(&lease.member))
                .arg("auto")
                .query_async(&mut redis)
                .await?;
            let next = auto.unwrap_or(0) + 1;
            // A refusal (the run was rerun by hand meanwhile: nothing left) ends it here.
            let _ = rerun(engine, &lease.member, None, "workflows", next).await?;
        }
        queue.done(&mut redis, &lease).await?;
    }
    Ok(())
}

/// The `workflows-worker` process: step workers, the watcher, cron and event triggers, with
/// `/healthz` and `/readyz` on `INKWIRE_HTTP_ADDR` for the orchestrator (and the crash
/// tests) to see it up.
pub async fn worker_from_env() -> anyhow::Result<()> {
    let config = WorkflowsConfig::from_env()?;
    let app = inkwire_shared::AppState::start_from_env("inkwire-workflows-worker").await?;
    let addr = app.config.http_addr;
    let (trigger, shutdown) = inkwire_shared::consumer::ShutdownTrigger::new();
    let engine = Engine::new(app.js.clone(), app.redis.clone(), config).with_jwt(app.jwt.clone());
    let worker = tokio::spawn(run_worker(engine, shutdown));
    let health = inkwire_shared::http::health_routes().with_state(app);
    inkwire_shared::http::serve(health, addr, async move {
        inkwire_shared::http::shutdown_signal().await;
        trigger.trigger();
    })
    .await?;
    worker.await??;
    Ok(())
}
