//! The request bodies of the coordinator's operator API (JSON).

use serde::{Deserialize, Serialize};

use crate::pipeline::RolloutDefaults;

/// `POST /v1/promotions`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PromoteRequest {
    /// `app@version`.
    pub release: String,
    /// The environment.
    pub env: String,
    /// Skip the pipeline's order (recorded).
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/deployments`; unset fields take the app's defaults.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeployRequest {
    /// `app@version`.
    pub release: String,
    /// The environment.
    pub env: String,
    /// live, rolling or blue-green.
    pub strategy: Option<String>,
    /// `1,10%,50%,100%`.
    pub waves: Option<String>,
    /// swarm, push or pull.
    pub mode: Option<String>,
    /// A count or a percentage.
    pub max_failures: Option<String>,
    /// How long rolling targets drain.
    pub drain_seconds: Option<f64>,
    /// No progress this long: slow; twice: failed.
    pub progress_deadline_seconds: Option<f64>,
}

/// `POST /v1/rollbacks`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// The app.
    pub app: String,
    /// The environment.
    pub env: String,
}

impl DeployRequest {
    /// The app's defaults with what this request sets in their place;
    /// [`Pipelines::settings`](crate::pipeline::Pipelines::settings)
    /// checks the result.
    pub fn over(&self, defaults: &RolloutDefaults) -> RolloutDefaults {
        let mut o = defaults.clone();
        if let Some(v) = &self.strategy {
            o.strategy = v.clone();
        }
        if let Some(v) = &self.waves {
            o.waves = v.clone();
        }
        if let Some(v) = &self.mode {
            o.mode = v.clone();
        }
        if let Some(v) = &self.max_failures {
            o.max_failures = v.clone();
        }
        if let Some(v) = self.drain_seconds {
            o.drain_seconds = Some(v);
        }
        if let Some(v) = self.progress_deadline_seconds {
            o.progress_deadline_seconds = v;
        }
        o
    }
}
