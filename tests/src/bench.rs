//! What the `bench/` programs share: their `--name value` flags, each with a default.

use anyhow::{Context, Result};
use std::collections::HashMap;

/// The program's `--name value` flags: every name in `defaults` (with its default unless
/// given); anything else is an error that shows `usage`.
pub struct Flags(HashMap<String, String>);

impl Flags {
    pub fn parse(usage: &str, defaults: &[(&str, &str)]) -> Result<Flags> {
        let mut values: HashMap<String, String> =
            defaults.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let name = flag.strip_prefix("--").filter(|n| values.contains_key(*n));
            let Some(name) = name else { anyhow::bail!("usage: {usage}") };
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            values.insert(name.to_string(), value);
        }
        Ok(Flags(values))
    }

    /// The value of `--name`, parsed.
    pub fn get<T: std::str::FromStr>(&self, name: &str) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        let v = self.0.get(name).with_context(|| format!("no flag --{name}"))?;
        v.parse().with_context(|| format!("--{name} {v}"))
    }
}
