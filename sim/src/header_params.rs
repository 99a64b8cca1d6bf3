//! Reading a trace header's parameters back, with the errors every
//! campaign's `from_header` gives: a missing parameter, a value that is not
//! a number, a flag that is not 0 or 1, a size out of its bounds, an
//! unknown mutation, bad fault swarm settings.

use dmsim_faults::FaultSwarm;
use dmsim_model::mutation::Mutations;
use dmsim_traces::Header;

/// A header's parameters.
#[derive(Debug, Clone, Copy)]
pub struct HeaderParams<'a>(pub &'a Header);

impl<'a> HeaderParams<'a> {
    /// The value of `name`, or the error that it is missing.
    pub fn get(&self, name: &str) -> Result<&'a str, String> {
        self.0.param(name).ok_or_else(|| format!("trace header lacks parameter {name:?}"))
    }

    /// `name` as a number.
    pub fn num<T: std::str::FromStr>(&self, name: &str) -> Result<T, String> {
        let v = self.get(name)?;
        v.parse().map_err(|_| format!("trace header parameter {name:?}: {v:?} is not a number"))
    }

    /// `name` as a flag (`0` or `1`).
    pub fn flag(&self, name: &str) -> Result<bool, String> {
        match self.get(name)? {
            "0" => Ok(false),
            "1" => Ok(true),
            v => Err(format!("trace header parameter {name:?}: expected 0 or 1, got {v:?}")),
        }
    }

    /// `name` as a flag, false when absent (a trace recorded before the
    /// setting existed ran without it).
    pub fn flag_or_off(&self, name: &str) -> Result<bool, String> {
        if self.0.param(name).is_some() {
            self.flag(name)
        } else {
            Ok(false)
        }
    }

    /// The `mutations` parameter (comma-separated names).
    pub fn mutations(&self) -> Result<Mutations, String> {
        let text = self.get("mutations")?;
        Mutations::from_names(text.split(',').filter(|s| !s.is_empty()))
            .ok_or_else(|| format!("unknown mutation in {text:?}"))
    }

    /// The fault swarm of the `swarm.*` parameters.
    pub fn swarm(&self) -> Result<FaultSwarm, String> {
        let params: Vec<(String, String)> = self
            .0
            .params
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("swarm.").map(|k| (k.to_string(), v.clone())))
            .collect();
        FaultSwarm::from_params(&params).map_err(|e| format!("trace header: {e}"))
    }
}

/// `Err` unless `lo <= v <= hi`, naming `what`.
pub fn within(what: &str, v: u64, lo: u64, hi: u64) -> Result<(), String> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(format!("trace header: {what} {v} is outside {lo}..={hi}"))
    }
}
