//! A pipelines file from an operator: parse and check it, then ask of
//! every app what the coordinator asks (settings for each environment of
//! its pipeline, promotion rules, wave boundaries).
#![no_main]

use convoy_protocol::pipeline::Pipelines;
use convoy_protocol::plan::wave_ends;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(pipelines) = Pipelines::parse(text) else {
        return;
    };
    for (name, app) in &pipelines.apps {
        for (i, env) in app.pipeline.iter().enumerate() {
            let _ = pipelines.may_promote(name, env, &app.pipeline[..i]);
            let Ok(settings) = pipelines.settings(name, env, &app.rollout) else {
                continue;
            };
            for n in [0, 1, 2, 7, 100, 10_000] {
                let ends = wave_ends(&settings.waves, n);
                assert!(ends.windows(2).all(|w| w[0] < w[1]), "{ends:?}");
                assert_eq!(ends.last().copied().unwrap_or(0), n, "{ends:?}");
                let _ = settings.max_failures.floor_of(n);
            }
        }
    }
});
