//! Reading the configuration: the TOML file, the environment overlay, and
//! errors that name the key (and the variable) at fault.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde_path_to_error::{Path as KeyPath, Segment};
use toml::{Table, Value};

use super::Config;

/// The prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "TOOLWARDEN_";

/// The sections that environment variables can set, as
/// `TOOLWARDEN_<SECTION>_<KEY>` (section and key upper-cased). Per-tool
/// overrides (`[tools."name"]`) can only be set in the file: tool names are
/// not valid variable names in general.
///
/// Variables with the prefix that name none of these sections are not
/// configuration (the test suite's `TOOLWARDEN_SERVER_EVERYTHING`, say) and
/// are ignored, as is `TOOLWARDEN_REDIS_SERVER` (the test suite's
/// `redis-server`, not a `[redis]` key).
pub const SECTIONS: &[&str] = &[
    "upstream",
    "downstream",
    "catalog",
    "http",
    "limits",
    "circuit_breaker",
    "rate_limit",
    "retry",
    "loop_guard",
    "fallback_cache",
    "observability",
    "bulkhead",
    "coalesce",
    "hedge",
    "redis",
    "gateway",
];

/// `TOOLWARDEN_*` variables that look like a section's key but are not
/// configuration: the test suite's `redis-server` binary
/// (`TOOLWARDEN_REDIS_SERVER`) is not `redis.server`.
const NOT_CONFIGURATION: &[&str] = &["TOOLWARDEN_REDIS_SERVER"];

/// A configuration that could not be read or was refused.
///
/// Its `Display` names the key (`circuit_breaker.failure_threshold`) and, when
/// the value came from the environment, the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFileError {
    key: Option<String>,
    env_var: Option<String>,
    message: String,
}

impl ConfigFileError {
    pub(crate) fn new(key: Option<String>, message: impl Into<String>) -> Self {
        ConfigFileError {
            key,
            env_var: None,
            message: message.into(),
        }
    }

    /// The key at fault, as a dotted path (`tools."search".retry.max_attempts`),
    /// when the error is about one key.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The environment variable that set the key at fault, if one did.
    #[must_use]
    pub fn env_var(&self) -> Option<&str> {
        self.env_var.as_deref()
    }

    /// What is wrong, without the key.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.key, &self.env_var) {
            (Some(key), Some(var)) => write!(
                f,
                "invalid configuration: `{key}` (set by the environment variable {var}): {}",
                self.message
            ),
            (Some(key), None) => write!(f, "invalid configuration: `{key}`: {}", self.message),
            (None, _) => write!(f, "invalid configuration: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigFileError {}

/// A tool name as it appears in a key path: always quoted, as in the file.
pub(crate) fn quote_key(name: &str) -> String {
    serde_json::to_string(name).unwrap_or_else(|_| format!("\"{name}\""))
}

fn render_path(path: &KeyPath) -> String {
    let mut out = String::new();
    let mut previous_was_tools = false;
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
                previous_was_tools = false;
                continue;
            }
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                if previous_was_tools {
                    out.push_str(&quote_key(key));
                    previous_was_tools = false;
                } else {
                    previous_was_tools = out.is_empty() && key == "tools";
                    out.push_str(key);
                }
            }
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
                previous_was_tools = false;
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
                previous_was_tools = false;
            }
        }
    }
    out
}

/// Reads an environment value: a TOML literal if it is one (`5`, `0.5`,
/// `true`, `["a", "b"]`, `"quoted"`), else the text itself as a string
/// (`30s`, `reject`, `10/s`).
pub(crate) fn env_value(raw: &str) -> Value {
    match format!("value = {raw}").parse::<Table>() {
        Ok(mut table) if table.len() == 1 => table
            .remove("value")
            .unwrap_or_else(|| Value::String(raw.to_owned())),
        _ => Value::String(raw.to_owned()),
    }
}

/// Splits `CIRCUIT_BREAKER_FAILURE_THRESHOLD` into the section and the key.
pub(crate) fn split_variable(rest: &str) -> Option<(&'static str, String)> {
    SECTIONS.iter().find_map(|section| {
        let upper = section.to_ascii_uppercase();
        let key = rest.strip_prefix(upper.as_str())?.strip_prefix('_')?;
        Some((*section, key.to_ascii_lowercase()))
    })
}

/// Which key each overriding variable set: key path → variable name.
type EnvKeys = BTreeMap<String, String>;

fn overlay<I>(table: &mut Table, env: I) -> Result<EnvKeys, ConfigFileError>
where
    I: IntoIterator<Item = (String, String)>,
{
    // Sorted, so that the same environment always gives the same error.
    let vars: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(name, _)| {
            name.starts_with(ENV_PREFIX) && !NOT_CONFIGURATION.contains(&name.as_str())
        })
        .collect();
    let mut keys = EnvKeys::new();
    for (name, raw) in vars {
        let rest = &name[ENV_PREFIX.len()..];
        let Some((section, key)) = split_variable(rest) else {
            continue; // not configuration
        };
        if key.is_empty() {
            return Err(ConfigFileError {
                key: Some(section.to_owned()),
                env_var: Some(name.clone()),
                message: "the variable names a section but no key".into(),
            });
        }
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(section_table) = entry else {
            return Err(ConfigFileError::new(
                Some(section.to_owned()),
                "must be a table",
            ));
        };
        keys.insert(format!("{section}.{key}"), name.clone());
        section_table.insert(key, env_value(&raw));
    }
    Ok(keys)
}

/// The variable that set `key` or the table holding it.
fn env_var_for(keys: &EnvKeys, key: &str) -> Option<String> {
    keys.iter()
        .filter(|(path, _)| {
            key == path.as_str()
                || key
                    .strip_prefix(path.as_str())
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
        .max_by_key(|(path, _)| path.len())
        .map(|(_, var)| var.clone())
}

/// The message of a deserialization error without toml's own decorations.
fn clean_message(error: &toml::de::Error) -> String {
    error.message().trim().to_owned()
}

impl Config {
    /// Reads `path` (or no file: every default) and applies the environment
    /// overrides in `env` (pass [`process_env`] for the real environment),
    /// then [validates](Config::validate) the result.
    pub fn load<I>(path: Option<&Path>, env: I) -> Result<Config, ConfigFileError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                ConfigFileError::new(None, format!("cannot read {}: {e}", path.display()))
            })?,
            None => String::new(),
        };
        Config::from_toml_str(&text, env)
    }

    /// Parses a configuration from TOML text, applies `env` and validates it.
    pub fn from_toml_str<I>(text: &str, env: I) -> Result<Config, ConfigFileError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut table: Table = text.parse().map_err(|e: toml::de::Error| {
            // Syntax errors carry a line and column; say where.
            ConfigFileError::new(None, format!("not valid TOML: {}", e.to_string().trim()))
        })?;
        let env_keys = overlay(&mut table, env)?;
        let config: Config = serde_path_to_error::deserialize(Value::Table(table)).map_err(
            |e: serde_path_to_error::Error<toml::de::Error>| {
                let key = render_path(e.path());
                let env_var = env_var_for(&env_keys, &key);
                ConfigFileError {
                    key: (!key.is_empty() && key != "?").then_some(key),
                    env_var,
                    message: clean_message(e.inner()),
                }
            },
        )?;
        config.validate().map_err(|e| {
            let key = e.field().to_owned();
            ConfigFileError {
                env_var: env_var_for(&env_keys, &key),
                key: Some(key),
                message: e.reason().to_owned(),
            }
        })?;
        Ok(config)
    }
}

/// The process's `TOOLWARDEN_*` variables, for [`Config::load`]. Names that
/// are not UTF-8 are skipped; values that are not are read lossily (and then
/// refused by the key they set, naming the variable).
#[must_use]
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            name.starts_with(ENV_PREFIX)
                .then(|| (name, value.to_string_lossy().into_owned()))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod test_support {
    pub(crate) use super::{env_value, split_variable};
}
