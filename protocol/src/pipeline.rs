//! Apps, their pipelines of environments, and the rules of promotion.
//!
//! The coordinator loads them from a TOML file:
//!
//! ```toml
//! [environments.staging]
//! selector = "env=staging"
//!
//! [environments.production]
//! selector = "env=production"
//! blue_green = true          # its targets carry slice=blue or slice=green
//!
//! [environments.production.load_balancer]  # how its load balancers check /health
//! check_interval_seconds = 2.0              # HAProxy's `inter`
//! fall = 3                                  # failed checks that take a target out
//! rise = 2                                  # good checks that put it back
//!
//! [apps.web]
//! pipeline = ["staging", "production"]
//!
//! [apps.web.rollout]         # defaults for deployments of this app
//! strategy = "rolling"
//! waves = "1,10%,50%,100%"
//! mode = "swarm"
//! max_failures = "10%"
//! drain_seconds = 7.0        # default: 1, or (fall + 1) × interval behind a load balancer
//! progress_deadline_seconds = 120
//! ```
//!
//! A release may be promoted to an app's first environment at any time,
//! and to each later one only after a roll-out of it succeeded in the
//! environment before (`force` overrides, and is recorded).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::plan::{parse_waves, Amount, Strategy};
use crate::wire::{DistributionMode, Labels};

/// A set of targets, by labels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// `KEY=VALUE[,KEY=VALUE...]`: every label must match.
    pub selector: String,
    /// Its targets are split in `slice=blue` and `slice=green`.
    #[serde(default)]
    pub blue_green: bool,
    /// How the load balancers in front of its targets check their health
    /// endpoint, if any do.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
}

/// How a load balancer checks a target's `GET /health`: what a drain and
/// an undrain must wait for it to see.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadBalancer {
    /// Seconds between two checks of one target (HAProxy: `inter`; nginx
    /// plus: `interval`).
    pub check_interval_seconds: f64,
    /// Failed checks in a row that take a target out (HAProxy: `fall`).
    pub fall: u32,
    /// Good checks in a row that put it back (HAProxy: `rise`).
    pub rise: u32,
}

impl Default for LoadBalancer {
    /// HAProxy's defaults.
    fn default() -> Self {
        Self {
            check_interval_seconds: 2.0,
            fall: 3,
            rise: 2,
        }
    }
}

impl LoadBalancer {
    /// The longest a drained target may still be sent new requests: until
    /// `fall` checks have failed, the first of them up to one interval
    /// after the drain.
    pub fn sees_drain_ms(&self) -> u64 {
        (self.check_interval_seconds * 1000.0 * f64::from(self.fall)).round() as u64
    }

    /// The drain a roll-out waits by default: the time the balancer takes
    /// to see it and one interval more for the requests it sent before.
    pub fn default_drain_ms(&self) -> u64 {
        (self.check_interval_seconds * 1000.0 * f64::from(self.fall + 1)).round() as u64
    }

    /// How long after an undrain until the balancer sends requests again:
    /// `rise` good checks, the first up to one interval after.
    pub fn sees_undrain_ms(&self) -> u64 {
        (self.check_interval_seconds * 1000.0 * f64::from(self.rise)).round() as u64
    }

    fn check(&self) -> Result<(), String> {
        let i = self.check_interval_seconds;
        if !(i.is_finite() && i > 0.0 && i <= 3600.0) {
            return Err(format!(
                "check_interval_seconds must be more than 0 and at most 3600, not {i}"
            ));
        }
        if self.fall == 0 || self.rise == 0 {
            return Err("fall and rise must be at least 1".into());
        }
        Ok(())
    }
}

/// How an app's deployments run unless the deploy says otherwise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutDefaults {
    /// live, rolling or blue-green.
    pub strategy: String,
    /// Cumulative waves, e.g. `1,10%,50%,100%`.
    pub waves: String,
    /// swarm, push or pull.
    pub mode: String,
    /// Failures tolerated over the roll-out: a count or a percentage.
    pub max_failures: String,
    /// Seconds a rolling target stays drained before it switches; unset,
    /// 1, or what the environment's load balancer needs
    /// ([`LoadBalancer::default_drain_ms`]).
    pub drain_seconds: Option<f64>,
    /// A target without progress this long is slow; twice this, failed.
    pub progress_deadline_seconds: f64,
}

impl Default for RolloutDefaults {
    fn default() -> Self {
        Self {
            strategy: "rolling".into(),
            waves: "1,10%,50%,100%".into(),
            mode: "swarm".into(),
            max_failures: "0".into(),
            drain_seconds: None,
            progress_deadline_seconds: 120.0,
        }
    }
}

/// One app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// The environments a release goes through, in order.
    pub pipeline: Vec<String>,
    /// Deployment defaults.
    #[serde(default)]
    pub rollout: RolloutDefaults,
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipelines {
    /// Environments by name.
    #[serde(default)]
    pub environments: BTreeMap<String, Environment>,
    /// Apps by name.
    #[serde(default)]
    pub apps: BTreeMap<String, App>,
}

/// A deployment's settings, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// How it goes live.
    pub strategy: Strategy,
    /// Waves.
    pub waves: Vec<Amount>,
    /// Distribution mode.
    pub mode: DistributionMode,
    /// Failures tolerated.
    pub max_failures: Amount,
    /// Drain period, milliseconds.
    pub drain_ms: u64,
    /// How long a target waits after going back into load before it
    /// reports done, so that the load balancer sends it requests again
    /// before the next wave drains others: milliseconds.
    pub settle_ms: u64,
    /// What is unsafe about these settings, for the operator to see.
    pub warnings: Vec<String>,
    /// Progress deadline, milliseconds.
    pub progress_deadline_ms: u64,
}

impl Pipelines {
    /// Parses and checks a pipelines file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let p: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        p.check()?;
        Ok(p)
    }

    fn check(&self) -> Result<(), String> {
        for (name, env) in &self.environments {
            parse_selector(&env.selector).map_err(|e| format!("environment {name}: {e}"))?;
            if let Some(lb) = &env.load_balancer {
                lb.check()
                    .map_err(|e| format!("environment {name}: load_balancer: {e}"))?;
            }
        }
        for (name, app) in &self.apps {
            convoy_chunker::validate_name("app", name).map_err(|e| e.to_string())?;
            if app.pipeline.is_empty() {
                return Err(format!("app {name}: the pipeline is empty"));
            }
            for (i, env) in app.pipeline.iter().enumerate() {
                if !self.environments.contains_key(env) {
                    return Err(format!("app {name}: environment {env:?} is not defined"));
                }
                if app.pipeline[..i].contains(env) {
                    return Err(format!("app {name}: {env} appears twice in the pipeline"));
                }
            }
            let d = &app.rollout;
            self.settings(name, &app.pipeline[0], d)
                .map_err(|e| format!("app {name}: rollout: {e}"))?;
        }
        Ok(())
    }

    /// The settings of a deployment of `app` to `env`: the app's defaults
    /// with `overrides` applied; checked against the environment.
    pub fn settings(
        &self,
        app: &str,
        env: &str,
        overrides: &RolloutDefaults,
    ) -> Result<Settings, String> {
        let e = self
            .environments
            .get(env)
            .ok_or_else(|| format!("no environment {env:?}"))?;
        let strategy: Strategy = overrides.strategy.parse()?;
        if strategy == Strategy::BlueGreen && !e.blue_green {
            return Err(format!(
                "environment {env} has no blue and green slices (blue_green = true in the pipelines file)"
            ));
        }
        let seconds = |what: &str, s: f64| -> Result<u64, String> {
            if s.is_finite() && s >= 0.0 {
                Ok((s * 1000.0).round() as u64)
            } else {
                Err(format!("{what} must be a number of seconds, not {s}"))
            }
        };
        let deadline = seconds(
            "progress_deadline_seconds",
            overrides.progress_deadline_seconds,
        )?;
        if deadline == 0 {
            return Err("progress_deadline_seconds must be more than 0".into());
        }
        self.app(app)?;
        let lb = e.load_balancer.as_ref();
        let drain_ms = match overrides.drain_seconds {
            Some(s) => seconds("drain_seconds", s)?,
            None => lb.map_or(1000, LoadBalancer::default_drain_ms),
        };
        let mut warnings = Vec::new();
        // Rolling targets drain around their switch, blue-green's idle
        // slice before it gets the release; live ones never leave load.
        let drains = strategy != Strategy::Live;
        if let Some(lb) = lb.filter(|lb| drains && drain_ms <= lb.sees_drain_ms()) {
            warnings.push(format!(
                "the drain ({:.1} s) is not longer than {env}'s load balancer takes to see it \
                 ({} failed checks {} s apart: {:.1} s): it may send requests to a target \
                 while it switches; drain for {:.1} s or more",
                drain_ms as f64 / 1000.0,
                lb.fall,
                lb.check_interval_seconds,
                lb.sees_drain_ms() as f64 / 1000.0,
                lb.default_drain_ms() as f64 / 1000.0,
            ));
        }
        Ok(Settings {
            strategy,
            waves: parse_waves(&overrides.waves)?,
            mode: overrides.mode.parse()?,
            max_failures: Amount::parse(&overrides.max_failures)?,
            drain_ms,
            settle_ms: lb.map_or(0, LoadBalancer::sees_undrain_ms),
            warnings,
            progress_deadline_ms: deadline,
        })
    }

    /// The app, or an error naming the ones there are.
    pub fn app(&self, name: &str) -> Result<&App, String> {
        self.apps.get(name).ok_or_else(|| {
            format!(
                "no app {name:?} in the pipelines file (apps: {})",
                self.apps.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Whether `version` of `app` may be promoted to `env`, given the
    /// environments where a roll-out of it succeeded. `Err` says why not.
    pub fn may_promote(&self, app: &str, env: &str, succeeded_in: &[String]) -> Result<(), String> {
        let a = self.app(app)?;
        let Some(i) = a.pipeline.iter().position(|e| e == env) else {
            return Err(format!(
                "{env} is not in {app}'s pipeline ({})",
                a.pipeline.join(" → ")
            ));
        };
        match i.checked_sub(1).map(|p| &a.pipeline[p]) {
            Some(before) if !succeeded_in.contains(before) => Err(format!(
                "{app} must succeed in {before} before it is promoted to {env} (--force overrides)"
            )),
            _ => Ok(()),
        }
    }
}

/// Parses `KEY=VALUE[,KEY=VALUE...]`; `all` or nothing selects everyone.
pub fn parse_selector(text: &str) -> Result<Labels, String> {
    let mut labels = Labels::new();
    let text = text.trim();
    if text == "all" || text.is_empty() {
        return Ok(labels);
    }
    for part in text.split(',') {
        let (k, v) = part
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| format!("selector part {part:?} is not KEY=VALUE (or use `all`)"))?;
        labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(labels)
}

/// Whether `labels` have every label of `selector`.
pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[environments.staging]
selector = "env=staging"

[environments.production]
selector = "env=production"
blue_green = true

[apps.web]
pipeline = ["staging", "production"]

[apps.web.rollout]
strategy = "rolling"
waves = "1,50%,100%"
max_failures = "10%"
drain_seconds = 0.5
"#;

    #[test]
    fn a_pipelines_file_parses_with_defaults() {
        let p = Pipelines::parse(FILE).unwrap();
        let s = p
            .settings("web", "staging", &p.apps["web"].rollout)
            .unwrap();
        assert_eq!(s.strategy, Strategy::Rolling);
        assert_eq!(s.mode, DistributionMode::Swarm);
        assert_eq!(s.drain_ms, 500);
        assert_eq!(s.max_failures, Amount::Percent(10.0));
        assert_eq!(s.progress_deadline_ms, 120_000);
        assert_eq!(s.settle_ms, 0);
        assert!(s.warnings.is_empty());
    }

    #[test]
    fn a_load_balancer_sets_the_drain_and_warns_when_it_is_too_short() {
        let text = "[environments.prod]\nselector = \"env=prod\"\n\
                    [environments.prod.load_balancer]\ncheck_interval_seconds = 0.5\nfall = 2\n\
                    [apps.web]\npipeline = [\"prod\"]\n";
        let p = Pipelines::parse(text).unwrap();
        let mut d = RolloutDefaults::default();
        let s = p.settings("web", "prod", &d).unwrap();
        // (fall + 1) × interval to drain; rise (HAProxy's 2) × interval to settle.
        assert_eq!((s.drain_ms, s.settle_ms), (1500, 1000));
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        d.drain_seconds = Some(1.0);
        let s = p.settings("web", "prod", &d).unwrap();
        assert_eq!(s.drain_ms, 1000);
        assert_eq!(s.warnings.len(), 1);
        assert!(
            s.warnings[0].contains("2 failed checks 0.5 s apart: 1.0 s"),
            "{:?}",
            s.warnings
        );
        // A live roll-out drains nobody: nothing to warn of.
        d.strategy = "live".into();
        assert!(p.settings("web", "prod", &d).unwrap().warnings.is_empty());
        // Without a load balancer: 1 s, nothing to wait for after.
        let p = Pipelines::parse(FILE).unwrap();
        let s = p
            .settings("web", "staging", &RolloutDefaults::default())
            .unwrap();
        assert_eq!((s.drain_ms, s.settle_ms), (1000, 0));
        let bad = "[environments.prod]\nselector = \"env=prod\"\n\
                   [environments.prod.load_balancer]\ncheck_interval_seconds = 0\n";
        let e = Pipelines::parse(bad).unwrap_err();
        assert!(
            e.contains("environment prod: load_balancer: check_interval_seconds"),
            "{e}"
        );
    }

    #[test]
    fn mistakes_are_refused_with_what_is_wrong() {
        let bad = |text: &str, says: &str| {
            let e = Pipelines::parse(text).unwrap_err();
            assert!(e.contains(says), "{e:?} should say {says:?}");
        };
        bad(
            "[apps.web]\npipeline = [\"prod\"]\n",
            "environment \"prod\" is not defined",
        );
        bad("[environments.a]\nselector = \"x\"\n", "is not KEY=VALUE");
        bad(
            "[environments.a]\nselector = \"env=a\"\n[apps.web]\npipeline = []\n",
            "pipeline is empty",
        );
        bad(
            "[environments.a]\nselector = \"env=a\"\n[apps.web]\npipeline = [\"a\"]\n[apps.web.rollout]\nstrategy = \"blue-green\"\n",
            "no blue and green slices",
        );
        bad(
            "[environments.a]\nselector = \"env=a\"\ncolour = 1\n",
            "unknown field",
        );
    }

    #[test]
    fn promotion_follows_the_pipeline() {
        let p = Pipelines::parse(FILE).unwrap();
        assert!(p.may_promote("web", "staging", &[]).is_ok());
        let e = p.may_promote("web", "production", &[]).unwrap_err();
        assert!(e.contains("must succeed in staging"), "{e}");
        assert!(p
            .may_promote("web", "production", &["staging".into()])
            .is_ok());
        assert!(p.may_promote("web", "qa", &[]).is_err());
        assert!(p.may_promote("api", "staging", &[]).is_err());
    }

    #[test]
    fn selectors_parse_and_match() {
        let s = parse_selector("env=production, slice=blue").unwrap();
        let mut labels = Labels::new();
        labels.insert("env".into(), "production".into());
        assert!(!selects(&s, &labels));
        labels.insert("slice".into(), "blue".into());
        assert!(selects(&s, &labels));
        assert!(parse_selector("all").unwrap().is_empty());
        assert!(parse_selector("=x").is_err());
    }
}
