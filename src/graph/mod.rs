//! The build graph: recipes → a petgraph DAG of stages ([`dag`]) → run by the tokio scheduler
//! ([`scheduler`]).

pub mod dag;
pub mod scheduler;
