//! Runs the build DAG: tokio schedules every node whose upstream is done, at most `-j` at a time;
//! each stage's own work runs on a blocking thread (and uses rayon inside).

use super::dag::{BuildGraph, NodeSpec};
use crate::stages::{self, BuildContext, StageOutput, WouldRun};
use anyhow::Result;
use petgraph::graph::NodeIndex;
use petgraph::Direction;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// What happened to one node, for the summary, `--json`, `--dry-run` and `explain`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    pub stage: String,
    pub label: String,
    pub recipes: Vec<String>,
    pub key: Option<String>,
    /// "cached" (local cache), "remote" (downloaded from the remote cache), "ran", "would run",
    /// "blocked" (upstream would run), "failed", "skipped".
    pub status: String,
    /// Not computed by this build: "cached" or "remote".
    pub cached: bool,
    /// Seconds the stage took when it was computed (here, or where its cache entry came from).
    pub seconds: f64,
    /// For "remote": seconds this build spent looking it up and downloading it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_seconds: Option<f64>,
    pub outputs: BTreeMap<String, String>,
    /// For `explain`: which key inputs changed since the last build of this recipe.
    pub changes: Vec<String>,
}

pub struct RunResult {
    pub reports: Vec<NodeReport>,
    pub outputs: HashMap<NodeIndex, StageOutput>,
}

/// The scope a node records its key inputs under for each recipe (for `explain`).
pub fn scopes(g: &BuildGraph, node: NodeIndex) -> Vec<String> {
    let n = &g.graph[node];
    n.recipes
        .iter()
        .map(|&r| {
            let rec = &g.recipes[r];
            let stage = g.recipe_nodes[r]
                .iter()
                .find(|(_, x)| *x == node)
                .map(|(s, _)| s.as_str())
                .unwrap_or(n.spec.stage_name());
            format!("{}@{}/{stage}", rec.local_id(), rec.target.preset.name)
        })
        .collect()
}

/// Run one node, given its upstream outputs.
fn execute(
    ctx: &BuildContext,
    g: &BuildGraph,
    node: NodeIndex,
    up: &HashMap<NodeIndex, StageOutput>,
) -> Result<StageOutput> {
    let n = &g.graph[node];
    let dep = |i: usize| -> &StageOutput { &up[&n.deps[i]] };
    let scope = scopes(g, node);
    match &n.spec {
        NodeSpec::Fetch { source } => stages::fetch::run(ctx, source, &scope),
        NodeSpec::Load { architecture } => {
            stages::load::run(ctx, dep(0), architecture.as_deref(), &scope)
        }
        NodeSpec::DeltaMerge => stages::delta_merge::run(ctx, dep(0), dep(1), &scope),
        NodeSpec::Quantize {
            scheme,
            rule,
            calibration,
        } => {
            let desc = stages::load::read_description(ctx, dep(0))?;
            stages::quantize::run(
                ctx,
                dep(0),
                &desc,
                scheme,
                *rule,
                calibration.as_ref(),
                &scope,
            )
        }
        NodeSpec::Tune { recipe, target } => {
            let r = &g.recipes[*recipe];
            let plan = plan_for(ctx, g, *recipe, dep(0))?;
            stages::tune::run(ctx, &plan, target, r.tuning_file.as_deref(), &scope)
        }
        NodeSpec::Codegen { recipe } => {
            let r = &g.recipes[*recipe];
            let plan = plan_for(ctx, g, *recipe, dep(0))?;
            let req = stages::codegen::CodegenRequest {
                model_name: &r.model_name,
                scheme: r.quantization,
                target: &r.target,
                plan: &plan,
            };
            stages::codegen::run(ctx, &req, dep(1), &scope)
        }
        NodeSpec::Link { recipes } => {
            let first = recipes[0];
            let r = &g.recipes[first];
            let node_of = |ri: usize, stage: &str| {
                g.recipe_nodes[ri]
                    .iter()
                    .find(|(s, _)| s == stage)
                    .map(|(_, x)| *x)
            };
            let weights = node_of(first, "delta-merge")
                .or_else(|| node_of(first, "load"))
                .unwrap();
            let desc = stages::load::read_description(ctx, &up[&weights])?;
            let libraries = recipes
                .iter()
                .map(|&ri| stages::link::LinkLibrary {
                    recipe: &g.recipes[ri],
                    codegen: &up[&node_of(ri, "codegen").unwrap()],
                    tune: &up[&node_of(ri, "tune").unwrap()],
                })
                .collect();
            let sources = ["fetch", "fetch-delta"]
                .iter()
                .filter_map(|s| node_of(first, s))
                .map(|x| &up[&x])
                .collect();
            let stages_list = g.recipe_nodes[first]
                .iter()
                .filter(|(s, _)| s != "link")
                .filter_map(|(s, x)| up.get(x).map(|o| (s.clone(), o)))
                .collect();
            let req = stages::link::LinkRequest {
                recipe: r,
                libraries,
                quantize: &up[&node_of(first, "quantize").unwrap()],
                model: &up[&weights],
                sources,
                stages: stages_list,
                max_seq_len: stages::codegen::max_seq_len(&desc, r.max_seq_len),
            };
            let out = stages::link::run(ctx, &req)?;
            ctx.cache.mark_scopes(&out.inputs, &scope)?;
            Ok(out)
        }
    }
}

fn plan_for(
    ctx: &BuildContext,
    g: &BuildGraph,
    recipe: usize,
    weights: &StageOutput,
) -> Result<crate::formats::model_lib::plan::Plan> {
    let r = &g.recipes[recipe];
    let desc = stages::load::read_description(ctx, weights)?;
    stages::codegen::plan_for_target(
        &desc,
        r.quantization,
        stages::codegen::max_seq_len(&desc, r.max_seq_len),
        &r.target,
    )
}

/// Run (or, with `ctx.probe`, inspect) the whole graph.
pub fn run(ctx: Arc<BuildContext>, g: Arc<BuildGraph>, jobs: usize) -> Result<RunResult> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(jobs.max(1) + 2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(ctx, g, jobs.max(1)))
}

enum Done {
    Ok(StageOutput),
    WouldRun(WouldRun),
    Err(anyhow::Error),
}

async fn run_async(ctx: Arc<BuildContext>, g: Arc<BuildGraph>, jobs: usize) -> Result<RunResult> {
    let graph = &g.graph;
    let mut remaining: HashMap<NodeIndex, usize> = graph
        .node_indices()
        .map(|n| (n, graph.neighbors_directed(n, Direction::Incoming).count()))
        .collect();
    let outputs: Arc<Mutex<HashMap<NodeIndex, StageOutput>>> = Arc::new(Mutex::new(HashMap::new()));
    let mut reports: HashMap<NodeIndex, NodeReport> = HashMap::new();
    let mut ready: Vec<NodeIndex> = remaining
        .iter()
        .filter(|(_, &c)| c == 0)
        .map(|(&n, _)| n)
        .collect();
    ready.sort();
    let mut tasks = tokio::task::JoinSet::new();
    let mut running = 0usize;
    let mut first_error: Option<anyhow::Error> = None;
    let mut blocked: Vec<NodeIndex> = Vec::new();

    loop {
        while running < jobs && first_error.is_none() {
            let Some(node) = ready.pop() else { break };
            let (ctx2, g2, outs) = (ctx.clone(), g.clone(), outputs.clone());
            running += 1;
            tasks.spawn_blocking(move || {
                let up = outs.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let result = match execute(&ctx2, &g2, node, &up) {
                    Ok(o) => Done::Ok(o),
                    Err(e) => match e.downcast::<WouldRun>() {
                        Ok(w) => Done::WouldRun(w),
                        Err(e) => Done::Err(e),
                    },
                };
                (node, result)
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        running -= 1;
        let (node, done) = joined.map_err(|e| anyhow::anyhow!("a build task failed: {e}"))?;
        let n = &graph[node];
        let mut report = NodeReport {
            stage: n.spec.stage_name().to_string(),
            label: n.label.clone(),
            recipes: n.recipes.iter().map(|&r| g.recipes[r].local_id()).collect(),
            key: None,
            status: String::new(),
            cached: false,
            seconds: 0.0,
            download_seconds: None,
            outputs: BTreeMap::new(),
            changes: Vec::new(),
        };
        let mut release_children = false;
        match done {
            Done::Ok(o) => {
                report.key = Some(o.key.clone());
                report.cached = o.cached;
                report.status = match (o.cached, o.remote_seconds) {
                    (true, Some(_)) => "remote",
                    (true, None) => "cached",
                    (false, _) => "ran",
                }
                .to_string();
                report.seconds = o.seconds;
                report.download_seconds = o.remote_seconds;
                report.outputs = o
                    .outputs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.digest.clone()))
                    .collect();
                if let Some(d) = o.remote_seconds {
                    tracing::info!("{} downloaded from the remote cache in {d:.2}s", n.label);
                } else if !o.cached {
                    tracing::info!("{} done in {:.2}s", n.label, o.seconds);
                }
                outputs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(node, o);
                release_children = true;
            }
            Done::WouldRun(w) => {
                report.status = "would run".into();
                report.key = w.key;
                if let Some(inputs) = &w.inputs {
                    for s in scopes(&g, node) {
                        match ctx.cache.last_inputs(&s)? {
                            Some(old) => report.changes.extend(inputs.changes_from(&old)),
                            None => report.changes.push("never built before".into()),
                        }
                    }
                    report.changes.dedup();
                } else {
                    report
                        .changes
                        .push("remote source: resolved when the build runs".into());
                }
                blocked.extend(graph.neighbors_directed(node, Direction::Outgoing));
            }
            Done::Err(e) => {
                report.status = "failed".into();
                if first_error.is_none() {
                    first_error = Some(e.context(format!("stage `{}` failed", n.label)));
                }
            }
        }
        reports.insert(node, report);
        if release_children {
            for child in graph.neighbors_directed(node, Direction::Outgoing) {
                let c = remaining.get_mut(&child).unwrap();
                *c -= 1;
                if *c == 0 {
                    ready.push(child);
                }
            }
            ready.sort();
            ready.dedup();
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    // Nodes never reached: downstream of a would-run node (probe mode).
    for node in graph.node_indices() {
        reports.entry(node).or_insert_with(|| {
            let n = &graph[node];
            NodeReport {
                stage: n.spec.stage_name().to_string(),
                label: n.label.clone(),
                recipes: n.recipes.iter().map(|&r| g.recipes[r].local_id()).collect(),
                key: None,
                status: "blocked".into(),
                cached: false,
                seconds: 0.0,
                download_seconds: None,
                outputs: BTreeMap::new(),
                changes: vec!["an upstream stage would run".into()],
            }
        });
    }
    let _ = blocked;
    let order = petgraph::algo::toposort(graph, None)
        .map_err(|_| anyhow::anyhow!("the build graph has a cycle"))?;
    let outputs = std::mem::take(&mut *outputs.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(RunResult {
        reports: order
            .into_iter()
            .map(|n| reports.remove(&n).unwrap())
            .collect(),
        outputs,
    })
}
