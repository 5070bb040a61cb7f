//! Wasm component glue of the hostile anomaly fixture: the `anomaly-rule`
//! world.

wit_bindgen::generate!({ world: "anomaly-rule", path: "../../wit" });

segs_plugin_sdk::guest_config!(crate::Config, segs::rules::types::ConfigValue);

struct Component;

impl Guest for Component {
    fn configure(config: Config) -> Result<(), String> {
        set_config(config)
    }

    fn detect(batch: ReadingBatch) -> Vec<Finding> {
        if config().traps_on(batch.power_kw.len()) {
            panic!("hostile fixture: a batch of trap_from_readings or more");
        }
        Vec::new()
    }
}

export!(Component);
