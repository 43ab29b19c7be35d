//! The operator API's request bodies: the first byte picks the endpoint,
//! the rest is the JSON body. A deploy's overrides are checked against a
//! pipelines file as the coordinator checks them.
#![no_main]

use convoy_protocol::api::{DeployRequest, PromoteRequest, RollbackRequest};
use convoy_protocol::pipeline::Pipelines;
use libfuzzer_sys::fuzz_target;

const PIPELINES: &str = r#"
[environments.staging]
selector = "env=staging"

[environments.production]
selector = "env=production,dc=eu1"
blue_green = true

[apps.web]
pipeline = ["staging", "production"]

[apps.web.rollout]
strategy = "rolling"
waves = "1,10%,50%,100%"
max_failures = "10%"
"#;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            let Ok(r) = serde_json::from_slice::<DeployRequest>(body) else {
                return;
            };
            let pipelines = Pipelines::parse(PIPELINES).expect("the fixed file parses");
            let Ok(app) = pipelines.app("web") else {
                return;
            };
            let overridden = r.over(&app.rollout);
            if let Ok(s) = pipelines.settings("web", &r.env, &overridden) {
                let _ = convoy_protocol::plan::wave_ends(&s.waves, 1000);
            }
        }
        1 => {
            let _ = serde_json::from_slice::<PromoteRequest>(body);
        }
        _ => {
            let _ = serde_json::from_slice::<RollbackRequest>(body);
        }
    }
});
