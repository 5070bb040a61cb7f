//! The one place that runs `bindgen!` on `wit/`: typed host bindings for the
//! four rule worlds. The shared `segs:rules/types` interface is generated once
//! (with the anomaly world) and reused by the others, so a `ConfigValue` or a
//! `Severity` is the same Rust type everywhere in the host.

pub mod anomaly {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "anomaly-rule",
    });
}

pub mod overload {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "overload-rule",
        with: { "segs:rules/types": super::anomaly::segs::rules::types },
    });
}

pub mod tariff {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "tariff-rule",
        with: { "segs:rules/types": super::anomaly::segs::rules::types },
    });
}

pub mod aggregate {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "aggregate-rule",
        with: { "segs:rules/types": super::anomaly::segs::rules::types },
    });
}

pub use anomaly::segs::rules::types::{ConfigValue, Severity};
