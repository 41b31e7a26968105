//! Runtime: loads a built artifact (`dist/<model>-<quant>/`) and executes its plan. Reads only the
//! artifact: nothing here imports the build side (stages, graph, cache, recipe, model).

pub mod cpu;
