//! The vocabulary of a roll-out plan, shared by the pipelines file, the
//! operator API and the roll-out engine: strategies, blue-green slices,
//! amounts (a count or a percentage) and waves.

use serde::{Deserialize, Serialize};

/// How a release goes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Delivered while in load.
    Live,
    /// Drained, delivered, validated, back in load.
    Rolling,
    /// Delivered to the idle slice, then the slices swap.
    BlueGreen,
}

impl Strategy {
    /// The strategy's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Rolling => "rolling",
            Self::BlueGreen => "blue-green",
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "live" => Ok(Self::Live),
            "rolling" => Ok(Self::Rolling),
            "blue-green" => Ok(Self::BlueGreen),
            other => Err(format!(
                "unknown strategy {other:?}: use live, rolling or blue-green"
            )),
        }
    }
}

/// A blue-green slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Slice {
    /// `slice=blue`.
    Blue,
    /// `slice=green`.
    Green,
}

impl Slice {
    /// The other slice.
    pub fn other(self) -> Self {
        match self {
            Self::Blue => Self::Green,
            Self::Green => Self::Blue,
        }
    }

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Blue => "blue",
            Self::Green => "green",
        }
    }
}

/// A count, or a percentage of the environment's targets.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Amount {
    /// A number of targets.
    Count(usize),
    /// A share of the targets, in percent.
    Percent(f64),
}

impl Amount {
    /// Parses `3` or `10%`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("{text:?} is not a percentage"))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(format!("{text:?}: a percentage is between 0% and 100%"));
            }
            Ok(Self::Percent(v))
        } else {
            t.parse()
                .map(Self::Count)
                .map_err(|_| format!("{text:?} is neither a count nor a percentage"))
        }
    }

    /// The targets this amounts to out of `n`, rounding a percentage up.
    pub fn ceil_of(self, n: usize) -> usize {
        match self {
            Self::Count(c) => c.min(n),
            Self::Percent(p) => ((p / 100.0 * n as f64).ceil() as usize).min(n),
        }
    }

    /// The failures this tolerates out of `n` targets, rounding down.
    pub fn floor_of(self, n: usize) -> usize {
        match self {
            Self::Count(c) => c,
            Self::Percent(p) => (p / 100.0 * n as f64).floor() as usize,
        }
    }
}

/// Parses waves written as `1,10%,50%,100%`: each is the cumulative number
/// (or share) of targets delivered once the wave is done.
pub fn parse_waves(text: &str) -> Result<Vec<Amount>, String> {
    let waves: Vec<Amount> = text
        .split(',')
        .map(Amount::parse)
        .collect::<Result<_, _>>()?;
    if waves.is_empty() {
        return Err("no waves given".into());
    }
    Ok(waves)
}

/// Wave boundaries over `n` targets: cumulative ends, each larger than the
/// last, the final one `n` (a list that stops short is completed by one
/// more wave; a wave that would add nobody adds one target).
pub fn wave_ends(waves: &[Amount], n: usize) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut at = 0;
    for w in waves {
        if at == n {
            break;
        }
        let end = w.ceil_of(n).max(at + 1).min(n);
        ends.push(end);
        at = end;
    }
    if at < n {
        ends.push(n);
    }
    ends
}
