//! Where workflows live in Redis, and the scripts that move a run forward.
//!
//! - `inkwire:wf:def:{id}` — a hash: `latest` → the newest version, `v{n}` → version n's
//!   definition (JSON). Versions are immutable: a run keeps the version it started with.
//!   `inkwire:wf:defs` (every id) and `inkwire:wf:defs:{projectId}` (a project's) are sets.
//! - `inkwire:wf:run:{runId}` — one hash per run: the run's fields (`status`, `wf`, `ver`,
//!   `project`, `trigger`, `started`, `ended`, `error`, `left` = steps not yet in a final
//!   state, `order` = the steps that succeeded, in completion order) and per step `{f}:{step}`:
//!   `st` status, `at` attempt, `ev` its `action_executed` event until published, `tk` the token of the attempt holding it, `ls` the end of
//!   that attempt's lease, `rd` when a ready step may start (a retry's backoff), `wu` when a
//!   waiting delay ends, `in` / `out` / `err` (JSON), `t0` / `t1` (ms), `log` (a JSON list
//!   of every attempt: when, how long, the outcome and error), `deps` / `kids` (the
//!   DAG's edges, comma-separated, so that the scripts release dependants without the
//!   definition).
//!   A step with a compensation has `cmp:{step}`; while a run rolls back, each compensation
//!   is a pseudo-step `{step}~c` with the same fields, chained in reverse completion order.
//! - `inkwire:wf:runs:{workflowId}` — a sorted set of its runs by start time (the executions
//!   list); `inkwire:wf:once:{workflowId}:{key}` — the run an idempotency key or a triggering
//!   event started (a second start answers that run).
//! - `inkwire:wf:watch` — a [`DueQueue`](inkwire_shared::due_queue::DueQueue) of active runs
//!   by the next time the watcher must look at them (a ready step that was never dispatched,
//!   a retry's backoff ending, a delay ending, a lease that ran out). The scripts that create
//!   such a time pull the run's score forward (`ZADD LT`) and end the watcher's claim on it,
//!   so the watcher's reschedule never pushes a newer time back.
//!
//! Every transition of a step is one script, so it is atomic with the release of its
//! dependants, and every script checks the attempt's token first: an attempt that lost its
//! lease (a stalled worker, an ack that JetStream accepted after its ack wait) can no longer
//! change the run.

use std::sync::OnceLock;

pub const PREFIX: &str = "inkwire:wf";

pub fn definition_key(id: &str) -> String {
    format!("{PREFIX}:def:{id}")
}

pub fn definitions_key() -> String {
    format!("{PREFIX}:defs")
}

pub fn project_definitions_key(project: &str) -> String {
    format!("{PREFIX}:defs:{project}")
}

pub fn run_key(run: &str) -> String {
    format!("{PREFIX}:run:{run}")
}

pub fn runs_key(workflow: &str) -> String {
    format!("{PREFIX}:runs:{workflow}")
}

/// The run started by an idempotency key (or a triggering event's id).
pub fn once_key(workflow: &str, key: &str) -> String {
    format!("{PREFIX}:once:{workflow}:{key}")
}

/// A workflow's counters: `started`, `completed`, `failed`, `cancelled`,
/// `completedDurationMs` (the sum), `stepsSucceeded`, `stepsFailed`.
pub fn stats_key(workflow: &str) -> String {
    format!("{PREFIX}:stats:{workflow}")
}

pub fn watch_key() -> String {
    format!("{PREFIX}:watch")
}

/// The watcher's claim on a run (the [`DueQueue`] lease key).
pub fn watch_lease_key(run: &str) -> String {
    format!("{PREFIX}:watch:lease:{run}")
}

/// Run statuses.
pub mod status {
    pub const RUNNING: &str = "running";
    pub const COMPLETED: &str = "completed";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
    /// Compensations are running; then the run is failed or cancelled.
    pub const ROLLING_BACK: &str = "rolling_back";

    pub fn is_terminal(s: &str) -> bool {
        matches!(s, COMPLETED | FAILED | CANCELLED)
    }
}

/// Step statuses.
pub mod step_status {
    pub const PENDING: &str = "pending";
    pub const READY: &str = "ready";
    pub const RUNNING: &str = "running";
    pub const WAITING: &str = "waiting";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    pub const SKIPPED: &str = "skipped";
    pub const CANCELLED: &str = "cancelled";
}

fn script(cell: &'static OnceLock<redis::Script>, code: &str) -> &'static redis::Script {
    cell.get_or_init(|| redis::Script::new(code))
}

/// KEYS: run, watch, runs index, once key (or the run key again when there is none), stats.
/// ARGV: run id, now, watch at, workflow id, then field/value pairs.
/// Answers the run id: the new one, or the run the once key already started.
const CREATE: &str = r#"
if KEYS[4] ~= KEYS[1] then
  local prior = redis.call('GET', KEYS[4])
  if prior then return prior end
  redis.call('SET', KEYS[4], ARGV[1])
end
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('HINCRBY', KEYS[5], 'started', 1)
return ARGV[1]
"#;

pub fn create_script() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    script(&S, CREATE)
}

/// KEYS: run. ARGV: step, attempt, token, now, lease until.
/// Answers `{verdict, detail}`: `ok` + the state it started from (`ready`, `running` = a
/// takeover of an attempt whose lease ran out, `waiting` = a delay that has ended); `run` +
/// the run's status when the run is not running; `stale` (another attempt, or the step is
/// done); `busy` (a live attempt holds it); `early` + when it may start.
const START: &str = r#"
local K = KEYS[1]
local step = ARGV[1]
local now = tonumber(ARGV[4])
local st = redis.call('HGET', K, 'status')
local comp = string.sub(step, -2) == '~c'
if not ((st == 'running' and not comp) or (st == 'rolling_back' and comp)) then
  return {'run', st or 'missing'}
end
local s = redis.call('HGET', K, 'st:' .. step)
local a = tonumber(redis.call('HGET', K, 'at:' .. step) or '0')
if a ~= tonumber(ARGV[2]) then return {'stale', s or ''} end
if s == 'ready' then
  local rd = tonumber(redis.call('HGET', K, 'rd:' .. step) or '0')
  if rd > now then return {'early', tostring(rd)} end
elseif s == 'running' then
  if tonumber(redis.call('HGET', K, 'ls:' .. step) or '0') >= now then return {'busy', ''} end
elseif s == 'waiting' then
  local wu = tonumber(redis.call('HGET', K, 'wu:' .. step) or '0')
  if wu > now then return {'early', tostring(wu)} end
else
  return {'stale', s or ''}
end
redis.call('HSET', K, 'st:' .. step, 'running', 'tk:' .. step, ARGV[3], 'ls:' .. step, ARGV[5])
redis.call('HSETNX', K, 't0:' .. step, ARGV[4])
return {'ok', s}
"#;

pub fn start_script() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    script(&S, START)
}

/// Marks a step done and releases what it unblocks, in one step.
///
/// KEYS: run, watch, watch lease. ARGV: step, token, outcome (`succeeded` | `failed`),
/// strategy (`fail` | `continue`), now, watch at, output JSON (or ''), error JSON (or ''),
/// rendered input JSON (or ''), run id, the step's event to publish (`ev:{step}`: attempt,
/// status and duration, kept until the event is acknowledged), the attempt's log record
/// (JSON), then the steps a condition did not take.
/// Answers `{run status after, ready steps...}` or `{'stale'}` when the token is not the
/// attempt's any more.
///
/// Release rule: a pending step whose dependencies are all `succeeded` or `failed` (only a
/// `continue` failure leaves the run running) becomes `ready`; one with a `skipped`
/// dependency is skipped, and so on down the graph. A `fail` failure skips every step not
/// started and fails the run; attempts still running finish, and their results are kept
/// but release nothing.
const FINISH: &str = r#"
local K = KEYS[1]
local step = ARGV[1]
local now = ARGV[5]
if redis.call('HGET', K, 'tk:' .. step) ~= ARGV[2] or redis.call('HGET', K, 'st:' .. step) ~= 'running' then
  return {'stale'}
end
redis.call('HSET', K, 'st:' .. step, ARGV[3], 't1:' .. step, now)
redis.call('HDEL', K, 'ls:' .. step)
if ARGV[7] ~= '' then redis.call('HSET', K, 'out:' .. step, ARGV[7]) end
if ARGV[8] ~= '' then redis.call('HSET', K, 'err:' .. step, ARGV[8]) else redis.call('HDEL', K, 'err:' .. step) end
if ARGV[9] ~= '' then redis.call('HSET', K, 'in:' .. step, ARGV[9]) end
if ARGV[11] and ARGV[11] ~= '' then redis.call('HSET', K, 'ev:' .. step, ARGV[11]) end
append_log(K, step, ARGV[12])
local comp = string.sub(step, -2) == '~c'
if ARGV[3] == 'succeeded' and not comp then
  local order = redis.call('HGET', K, 'order')
  if order and order ~= '' then order = order .. ',' .. step else order = step end
  redis.call('HSET', K, 'order', order)
end
local status = redis.call('HGET', K, 'status')
-- A result that arrives after the run stopped running (failed, cancelled, rolling back for
-- another step) is kept but changes nothing else.
if not ((status == 'running' and not comp) or (status == 'rolling_back' and comp)) then
  return {status}
end
local left = redis.call('HINCRBY', K, 'left', -1)
if ARGV[3] == 'failed' and ARGV[4] == 'rollback' then
  local first = begin_rollback(K, now, 'failed', ARGV[8], KEYS[2], KEYS[3], ARGV[10])
  if first then return {'rolling_back', first} end
  return {'failed'}
end
if ARGV[3] == 'failed' and ARGV[4] == 'fail' then
  local all = redis.call('HGETALL', K)
  for i = 1, #all, 2 do
    local f, v = all[i], all[i + 1]
    if string.sub(f, 1, 3) == 'st:' and (v == 'pending' or v == 'ready' or v == 'waiting') then
      redis.call('HSET', K, f, 'skipped')
      redis.call('HINCRBY', K, 'left', -1)
    end
  end
  redis.call('HSET', K, 'status', 'failed', 'ended', now, 'error', ARGV[8])
  return {'failed'}
end
local work = {step}
for i = 13, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', K, 'st:' .. id) == 'pending' then
    redis.call('HSET', K, 'st:' .. id, 'skipped')
    left = redis.call('HINCRBY', K, 'left', -1)
    table.insert(work, id)
  end
end
local ready = {}
while #work > 0 do
  local x = table.remove(work)
  local kids = redis.call('HGET', K, 'kids:' .. x) or ''
  for kid in string.gmatch(kids, '[^,]+') do
    if redis.call('HGET', K, 'st:' .. kid) == 'pending' then
      local skip, all = false, true
      local deps = redis.call('HGET', K, 'deps:' .. kid) or ''
      for d in string.gmatch(deps, '[^,]+') do
        local s = redis.call('HGET', K, 'st:' .. d)
        if s == 'skipped' then skip = true elseif s ~= 'succeeded' and s ~= 'failed' then all = false end
      end
      if skip then
        redis.call('HSET', K, 'st:' .. kid, 'skipped')
        left = redis.call('HINCRBY', K, 'left', -1)
        table.insert(work, kid)
      elseif all then
        redis.call('HSET', K, 'st:' .. kid, 'ready', 'at:' .. kid, '1', 'rd:' .. kid, now)
        table.insert(ready, kid)
      end
    end
  end
end
if left <= 0 then
  local final = 'completed'
  if status == 'rolling_back' then final = redis.call('HGET', K, 'endas') or 'failed' end
  redis.call('HSET', K, 'status', final, 'ended', now)
  return {final}
end
if #ready > 0 then
  redis.call('ZADD', KEYS[2], 'LT', ARGV[6], ARGV[10])
  redis.call('DEL', KEYS[3])
end
local out = {'running'}
for _, r in ipairs(ready) do table.insert(out, r) end
return out
"#;

pub fn finish_script() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    S.get_or_init(|| redis::Script::new(&format!("{BEGIN_ROLLBACK}{APPEND_LOG}{FINISH}")))
}

/// Appends one attempt's record (JSON) to a step's log (`log:{step}`, a JSON list kept as
/// text, at most the last 50 attempts' worth of growth is bounded by `maxAttempts`).
const APPEND_LOG: &str = r#"
local function append_log(K, step, entry)
  if not entry or entry == '' then return end
  local cur = redis.call('HGET', K, 'log:' .. step)
  if cur and string.len(cur) > 2 then
    cur = string.sub(cur, 1, -2) .. ',' .. entry .. ']'
  else
    cur = '[' .. entry .. ']'
  end
  redis.call('HSET', K, 'log:' .. step, cur)
end
"#;

/// Puts a running step back to `ready` for its next attempt (after a backoff), or to
/// `waiting` until a delay ends.
///
/// KEYS: run, watch, watch lease. ARGV: step, token, new state (`ready` | `waiting`), next
/// attempt, when (ms), error JSON (or ''), run id, the attempt's log record (JSON, or '').
/// Answers `ok`, `stale`, or the run's status when it is not running.
const SUSPEND: &str = r#"
local K = KEYS[1]
local step = ARGV[1]
if redis.call('HGET', K, 'tk:' .. step) ~= ARGV[2] or redis.call('HGET', K, 'st:' .. step) ~= 'running' then
  return 'stale'
end
local status = redis.call('HGET', K, 'status')
local comp = string.sub(step, -2) == '~c'
if not ((status == 'running' and not comp) or (status == 'rolling_back' and comp)) then
  return status
end
redis.call('HSET', K, 'st:' .. step, ARGV[3], 'at:' .. step, ARGV[4])
if ARGV[3] == 'ready' then
  redis.call('HSET', K, 'rd:' .. step, ARGV[5])
else
  redis.call('HSET', K, 'wu:' .. step, ARGV[5])
end
if ARGV[6] ~= '' then redis.call('HSET', K, 'err:' .. step, ARGV[6]) end
append_log(K, step, ARGV[8])
redis.call('HDEL', K, 'ls:' .. step)
redis.call('ZADD', KEYS[2], 'LT', ARGV[5], ARGV[7])
redis.call('DEL', KEYS[3])
return 'ok'
"#;

pub fn suspend_script() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    S.get_or_init(|| redis::Script::new(&format!("{APPEND_LOG}{SUSPEND}")))
}

/// Cancels a running run: steps not started become `cancelled`, attempts running see the
/// status at their next await point and stop. With compensations asked for, the completed
/// steps' compensations run first (the run is `rolling_back`, then `cancelled`).
/// KEYS: run, watch, watch lease. ARGV: now, reason JSON, run id, compensate (`1` | `0`).
/// Answers `{'ok', first compensation or ''}` or `{the run's status}`.
const CANCEL: &str = r#"
local K = KEYS[1]
local status = redis.call('HGET', K, 'status')
if status ~= 'running' then return {status or 'missing'} end
if ARGV[4] == '1' then
  local first = begin_rollback(K, ARGV[1], 'cancelled', ARGV[2], KEYS[2], KEYS[3], ARGV[3])
  if first then return {'ok', first} end
  return {'ok', ''}
end
local all = redis.call('HGETALL', K)
for i = 1, #all, 2 do
  local f, v = all[i], all[i + 1]
  if string.sub(f, 1, 3) == 'st:' and (v == 'pending' or v == 'ready' or v == 'waiting') then
    redis.call('HSET', K, f, 'cancelled')
  end
end
redis.call('HSET', K, 'status', 'cancelled', 'ended', ARGV[1], 'error', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3])
redis.call('DEL', KEYS[3])
return {'ok', ''}
"#;

pub fn cancel_script() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    S.get_or_init(|| redis::Script::new(&format!("{BEGIN_ROLLBACK}{CANCEL}")))
}

/// Starts a rollback (a Lua function the finish and cancel scripts share): every step not
/// started is skipped (`cancelled` when the run is cancelled); the compensations of the
/// steps that succeeded — those with one (`cmp:{id}`), in reverse completion order — become
/// a chain of pseudo-steps `{id}~c`, the first one ready; the run is `rolling_back` until
/// the chain ends, then `endas` (`failed` or `cancelled`). Without compensations the run
/// ends at once. Answers the first compensation, or nil.
const BEGIN_ROLLBACK: &str = r#"
local function begin_rollback(K, now, endas, err, watch, lease, run)
  local mark = 'skipped'
  if endas == 'cancelled' then mark = 'cancelled' end
  local all = redis.call('HGETALL', K)
  for i = 1, #all, 2 do
    local f, v = all[i], all[i + 1]
    if string.sub(f, 1, 3) == 'st:' and (v == 'pending' or v == 'ready' or v == 'waiting') then
      redis.call('HSET', K, f, mark)
    end
  end
  local order = {}
  for id in string.gmatch(redis.call('HGET', K, 'order') or '', '[^,]+') do
    table.insert(order, id)
  end
  local comps = {}
  for i = #order, 1, -1 do
    if redis.call('HGET', K, 'cmp:' .. order[i]) then table.insert(comps, order[i] .. '~c') end
  end
  if err ~= '' then redis.call('HSET', K, 'error', err) end
  if #comps == 0 then
    redis.call('HSET', K, 'status', endas, 'ended', now)
    redis.call('ZADD', watch, now, run)
    redis.call('DEL', lease)
    return nil
  end
  redis.call('HSET', K, 'status', 'rolling_back', 'endas', endas, 'left', #comps)
  for i, c in ipairs(comps) do
    redis.call('HSET', K, 'st:' .. c, 'pending', 'at:' .. c, '0',
      'deps:' .. c, comps[i - 1] or '', 'kids:' .. c, comps[i + 1] or '')
  end
  redis.call('HSET', K, 'st:' .. comps[1], 'ready', 'at:' .. comps[1], '1', 'rd:' .. comps[1], now)
  redis.call('ZADD', watch, 'LT', tonumber(now) + 5000, run)
  redis.call('DEL', lease)
  return comps[1]
end
"#;

/// The watcher's reschedule: sets the run's next look only if no script moved it since
/// the watcher claimed it (the claim's lease key still holds its token).
/// KEYS: watch, watch lease. ARGV: run id, token, at.
const RESCHEDULE: &str = r#"
if redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"#;

pub fn reschedule_script() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    script(&S, RESCHEDULE)
}

/// Clears a field and counts it, once. KEYS: the hash, the stats. ARGV: field, counter, by
/// (0: 1). Answers 1 when this call cleared it.
const COUNTED: &str = r#"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  local by = tonumber(ARGV[3])
  if by == 0 then by = 1 end
  redis.call('HINCRBY', KEYS[2], ARGV[2], by)
  return 1
end
return 0
"#;

pub fn counted_script() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    script(&S, COUNTED)
}

/// Marks a run's end announced and counts it, once. KEYS: run, stats. ARGV: now, status,
/// duration of a completed run (ms).
const ANNOUNCED: &str = r#"
if redis.call('HSETNX', KEYS[1], 'announced', ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
  if ARGV[2] == 'completed' then
    redis.call('HINCRBY', KEYS[2], 'completedDurationMs', ARGV[3])
  end
  return 1
end
return 0
"#;

pub fn announced_script() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    script(&S, ANNOUNCED)
}
