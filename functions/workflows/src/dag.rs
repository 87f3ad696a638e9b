//! The step graph of a definition, as the engine walks it: a topological order (Kahn's
//! algorithm, ties broken by declaration order so that the order is the same on every
//! machine and reads like the definition), each step's dependencies, dependants and
//! transitive dependencies, and the steps that are ready once a set of steps has finished.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::definition::Definition;

#[derive(Debug, Clone)]
pub struct Dag {
    ids: Vec<String>,
    index: HashMap<String, usize>,
    deps: Vec<Vec<usize>>,
    dependants: Vec<Vec<usize>>,
    order: Vec<usize>,
}

impl Dag {
    /// Builds the graph of a definition that [`parse_definition`](crate::parse_definition)
    /// accepted; a definition built by hand with an unknown dependency or a cycle is refused.
    pub fn new(definition: &Definition) -> Result<Dag, String> {
        let ids: Vec<String> = definition.steps.iter().map(|s| s.id.clone()).collect();
        let index: HashMap<String, usize> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        let mut deps = vec![Vec::new(); ids.len()];
        let mut dependants = vec![Vec::new(); ids.len()];
        for (i, step) in definition.steps.iter().enumerate() {
            for dep in &step.depends_on {
                let &d = index
                    .get(dep)
                    .ok_or_else(|| format!("step `{}` depends on unknown `{dep}`", step.id))?;
                deps[i].push(d);
                dependants[d].push(i);
            }
        }
        let order = topological_order(&deps).map_err(|stuck| {
            let names: Vec<&str> = stuck.iter().map(|&i| ids[i].as_str()).collect();
            format!("dependency cycle among {}", names.join(", "))
        })?;
        Ok(Dag {
            ids,
            index,
            deps,
            dependants,
            order,
        })
    }

    /// Every step, dependencies before dependants.
    pub fn order(&self) -> Vec<&str> {
        self.names(&self.order)
    }

    /// The steps `id` lists in `dependsOn` (empty for an unknown id).
    pub fn dependencies(&self, id: &str) -> Vec<&str> {
        self.index
            .get(id)
            .map_or_else(Vec::new, |&i| self.names(&self.deps[i]))
    }

    /// The steps that list `id` in their `dependsOn`, in declaration order.
    pub fn dependants(&self, id: &str) -> Vec<&str> {
        self.index
            .get(id)
            .map_or_else(Vec::new, |&i| self.names(&self.dependants[i]))
    }

    /// The steps that certainly finished before `id` starts: its transitive dependencies.
    pub fn ancestors(&self, id: &str) -> BTreeSet<&str> {
        let Some(&i) = self.index.get(id) else {
            return BTreeSet::new();
        };
        ancestors(&self.deps, i)
            .into_iter()
            .map(|a| self.ids[a].as_str())
            .collect()
    }

    /// The steps not in `finished` (completed or skipped) whose dependencies all are, in
    /// topological order: the ones to start next.
    pub fn ready(&self, finished: &HashSet<String>) -> Vec<&str> {
        self.order
            .iter()
            .filter(|&&i| {
                !finished.contains(&self.ids[i])
                    && self.deps[i]
                        .iter()
                        .all(|&d| finished.contains(&self.ids[d]))
            })
            .map(|&i| self.ids[i].as_str())
            .collect()
    }

    fn names(&self, indices: &[usize]) -> Vec<&str> {
        indices.iter().map(|&i| self.ids[i].as_str()).collect()
    }
}

/// Kahn's algorithm over `deps[i]` (the indices step `i` depends on), always taking the
/// lowest-index step among those ready. `Err` holds the steps left over: on or behind a cycle.
pub(crate) fn topological_order(deps: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let mut waiting: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut dependants = vec![Vec::new(); deps.len()];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependants[d].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..deps.len()).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(deps.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &j in &dependants[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                ready.insert(j);
            }
        }
    }
    if order.len() == deps.len() {
        Ok(order)
    } else {
        Err((0..deps.len()).filter(|&i| waiting[i] > 0).collect())
    }
}

/// Transitive dependencies of step `i` (safe on graphs with cycles).
pub(crate) fn ancestors(deps: &[Vec<usize>], i: usize) -> BTreeSet<usize> {
    let mut seen = BTreeSet::new();
    let mut stack = deps[i].clone();
    while let Some(d) = stack.pop() {
        if seen.insert(d) {
            stack.extend(&deps[d]);
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_definition;
    use serde_json::json;

    fn dag(steps: serde_json::Value) -> Dag {
        let def = json!({"id": "w", "version": 1, "projectId": "p", "triggers": [{"type": "manual"}], "steps": steps});
        let def = parse_definition(&def).expect("valid");
        Dag::new(&def).expect("dag")
    }

    fn delay(id: &str, deps: &[&str]) -> serde_json::Value {
        json!({"id": id, "action": "delay", "input": {"duration": "1s"}, "dependsOn": deps})
    }

    #[test]
    fn order_is_topological_and_stable() {
        let d = dag(json!([
            delay("report", &["sum", "fetch"]),
            delay("fetch", &[]),
            delay("sum", &["fetch", "count"]),
            delay("count", &[]),
            delay("log", &[]),
        ]));
        assert_eq!(d.order(), ["fetch", "count", "sum", "report", "log"]);
        assert_eq!(d.dependants("fetch"), ["report", "sum"]);
        assert_eq!(d.dependencies("sum"), ["fetch", "count"]);
        assert_eq!(
            d.ancestors("report").into_iter().collect::<Vec<_>>(),
            ["count", "fetch", "sum"]
        );
        let done = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        assert_eq!(d.ready(&done(&[])), ["fetch", "count", "log"]);
        assert_eq!(d.ready(&done(&["fetch"])), ["count", "log"]);
        assert_eq!(d.ready(&done(&["fetch", "count", "log"])), ["sum"]);
        assert!(
            d.ready(&done(&["fetch", "count", "log", "sum", "report"]))
                .is_empty()
        );
    }

    #[test]
    fn cycles_are_left_over() {
        assert_eq!(
            topological_order(&[vec![2], vec![0], vec![1], vec![]]),
            Err(vec![0, 1, 2])
        );
        assert_eq!(ancestors(&[vec![1], vec![0]], 0), BTreeSet::from([0, 1]));
    }
}
