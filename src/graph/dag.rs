//! The build DAG: every recipe's stages as petgraph nodes, with identical stages of different
//! recipes (same fetch, same quantization of the same weights) merged into one node.

use crate::recipe::{Recipe, Source, TargetSpec};
use anyhow::Result;
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::HashMap;

/// What a node does, with its static parameters. Upstream results arrive through the edges.
#[derive(Debug, Clone)]
pub enum NodeSpec {
    Fetch {
        source: Source,
    },
    Load {
        architecture: Option<String>,
    },
    /// deps: [base load, delta load]
    DeltaMerge,
    /// deps: [weights (load or delta-merge)]
    Quantize {
        scheme: &'static crate::quant::scheme::QuantScheme,
        rule: crate::quant::ScaleRule,
        /// GPTQ calibration, if the recipe asks for it.
        calibration: Option<crate::quant::calibration::Calibration>,
    },
    /// deps: [weights]
    Tune {
        recipe: usize,
        target: TargetSpec,
    },
    /// deps: [weights, tune]
    Codegen {
        recipe: usize,
    },
    /// deps: [weights, quantize, codegen…, tune…, fetch…]
    Link {
        recipes: Vec<usize>,
    },
}

impl NodeSpec {
    pub fn stage_name(&self) -> &'static str {
        match self {
            NodeSpec::Fetch { .. } => "fetch",
            NodeSpec::Load { .. } => "load",
            NodeSpec::DeltaMerge => "delta-merge",
            NodeSpec::Quantize { .. } => "quantize",
            NodeSpec::Tune { .. } => "tune",
            NodeSpec::Codegen { .. } => "codegen",
            NodeSpec::Link { .. } => "link",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub spec: NodeSpec,
    /// Human-readable label, e.g. "quantize tiny-llama q4f16_1".
    pub label: String,
    /// Indices of the recipes this node serves.
    pub recipes: Vec<usize>,
    /// Upstream nodes in the order the stage expects them.
    pub deps: Vec<NodeIndex>,
}

pub struct BuildGraph {
    pub graph: DiGraph<Node, ()>,
    pub recipes: Vec<Recipe>,
    /// Per recipe: (stage name, node) in pipeline order, for manifests and explain.
    pub recipe_nodes: Vec<Vec<(String, NodeIndex)>>,
}

struct Builder {
    graph: DiGraph<Node, ()>,
    by_identity: HashMap<String, NodeIndex>,
}

impl Builder {
    fn node(
        &mut self,
        identity: String,
        spec: NodeSpec,
        label: String,
        recipe: usize,
        deps: Vec<NodeIndex>,
    ) -> NodeIndex {
        if let Some(&n) = self.by_identity.get(&identity) {
            if !self.graph[n].recipes.contains(&recipe) {
                self.graph[n].recipes.push(recipe);
            }
            return n;
        }
        let n = self.graph.add_node(Node {
            spec,
            label,
            recipes: vec![recipe],
            deps: deps.clone(),
        });
        for d in deps {
            self.graph.add_edge(d, n, ());
        }
        self.by_identity.insert(identity, n);
        n
    }
}

/// Build the DAG of all recipes.
pub fn build(recipes: Vec<Recipe>) -> Result<BuildGraph> {
    let mut b = Builder {
        graph: DiGraph::new(),
        by_identity: HashMap::new(),
    };
    let mut recipe_nodes = Vec::new();
    let mut links: HashMap<String, NodeIndex> = HashMap::new();
    for (i, r) in recipes.iter().enumerate() {
        let mut nodes = Vec::new();
        let fetch = b.node(
            format!("fetch|{:?}", r.source),
            NodeSpec::Fetch {
                source: r.source.clone(),
            },
            format!("fetch {}", r.source.describe()),
            i,
            vec![],
        );
        let load_id = format!("load|{:?}|{:?}", r.source, r.architecture);
        let load = b.node(
            load_id.clone(),
            NodeSpec::Load {
                architecture: r.architecture.clone(),
            },
            format!("load {}", r.model_name),
            i,
            vec![fetch],
        );
        nodes.push(("fetch".to_string(), fetch));
        nodes.push(("load".to_string(), load));
        let (weights, weights_id) = match &r.delta {
            Some(delta) => {
                let dfetch = b.node(
                    format!("fetch|{delta:?}"),
                    NodeSpec::Fetch {
                        source: delta.clone(),
                    },
                    format!("fetch {}", delta.describe()),
                    i,
                    vec![],
                );
                let dload_id = format!("load|{delta:?}|{:?}", r.architecture);
                let dload = b.node(
                    dload_id.clone(),
                    NodeSpec::Load {
                        architecture: r.architecture.clone(),
                    },
                    format!("load {} (delta)", r.model_name),
                    i,
                    vec![dfetch],
                );
                let merge_id = format!("merge|{load_id}|{dload_id}");
                let merge = b.node(
                    merge_id.clone(),
                    NodeSpec::DeltaMerge,
                    format!("delta-merge {}", r.model_name),
                    i,
                    vec![load, dload],
                );
                nodes.push(("fetch-delta".to_string(), dfetch));
                nodes.push(("load-delta".to_string(), dload));
                nodes.push(("delta-merge".to_string(), merge));
                (merge, merge_id)
            }
            None => (load, load_id),
        };
        let q = r.quantization;
        let quant = b.node(
            format!(
                "quantize|{weights_id}|{}|{:?}|{}",
                q.name,
                r.scale_rule,
                r.calibration
                    .as_ref()
                    .map_or("none".to_string(), |c| c.describe())
            ),
            NodeSpec::Quantize {
                scheme: q,
                rule: r.scale_rule,
                calibration: r.calibration.clone(),
            },
            format!("quantize {} {}", r.model_name, q.name),
            i,
            vec![weights],
        );
        let target_id = format!(
            "{:?}|{:?}|{:?}|{:?}|{}",
            r.target, r.tuning_file, r.max_seq_len, q.name, r.model_name
        );
        let tune = b.node(
            format!("tune|{weights_id}|{target_id}"),
            NodeSpec::Tune {
                recipe: i,
                target: r.target.clone(),
            },
            format!("tune {} {}", r.local_id(), r.target.preset.name),
            i,
            vec![weights],
        );
        let codegen = b.node(
            format!("codegen|{weights_id}|{target_id}"),
            NodeSpec::Codegen { recipe: i },
            format!("codegen {} {}", r.local_id(), r.target.preset.name),
            i,
            vec![weights, tune],
        );
        nodes.push(("quantize".to_string(), quant));
        nodes.push(("tune".to_string(), tune));
        nodes.push(("codegen".to_string(), codegen));
        // One link per dist folder: several targets of one model-quant share it.
        let link = match links.get(&r.local_id()) {
            Some(&l) => {
                let other = &recipes[b.graph[l].recipes[0]];
                if other.quantization != r.quantization
                    || other.source != r.source
                    || other.delta != r.delta
                    || other.chat != r.chat
                    || other.max_seq_len != r.max_seq_len
                {
                    crate::user_bail!(
                        "{} and {} both build {} but differ in source, chat settings or max_seq_len; give one of them another model name",
                        other.origin,
                        r.origin,
                        r.local_id()
                    );
                }
                if let NodeSpec::Link { recipes } = &mut b.graph[l].spec {
                    recipes.push(i);
                }
                b.graph[l].recipes.push(i);
                b.graph[l].deps.extend([tune, codegen]);
                b.graph.add_edge(tune, l, ());
                b.graph.add_edge(codegen, l, ());
                l
            }
            None => {
                let mut deps = vec![weights, quant, fetch, tune, codegen];
                if r.delta.is_some() {
                    deps.insert(3, nodes.iter().find(|(n, _)| n == "fetch-delta").unwrap().1);
                }
                let l = b.graph.add_node(Node {
                    spec: NodeSpec::Link { recipes: vec![i] },
                    label: format!("link {}", r.local_id()),
                    recipes: vec![i],
                    deps: deps.clone(),
                });
                for d in deps {
                    b.graph.add_edge(d, l, ());
                }
                links.insert(r.local_id(), l);
                l
            }
        };
        nodes.push(("link".to_string(), link));
        recipe_nodes.push(nodes);
    }
    Ok(BuildGraph {
        graph: b.graph,
        recipes,
        recipe_nodes,
    })
}
