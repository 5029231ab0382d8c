//! What the layers' serde settings types share (feature `serde`): the
//! `false` that turns a knob off, and humantime durations.
//!
//! Each layer crate has an `XxxSettings` type (and an `XxxToolSettings` type
//! where its builder has per-tool overrides) whose keys are the builder's
//! method names, every one optional; the builder consumes it with
//! `settings(&XxxSettings)` and `tool_settings(name, &XxxToolSettings)`. The
//! types check nothing beyond the types of the values: the builder's `build`
//! does, naming the field.
//!
//! A knob whose builder method takes an `Option` (`None` turns a policy
//! off) is written as its value or `false`; these fields are
//! `Option<Option<T>>`, the outer `None` meaning "unset: the builder's
//! default". Durations are humantime strings (`"250ms"`, `"30s"`, `"5m"`).
//!
//! ```
//! use std::time::Duration;
//! use toolwarden_core::Bounds;
//!
//! #[derive(serde::Deserialize)]
//! struct Section {
//!     #[serde(default, with = "toolwarden_core::settings::or_off")]
//!     threshold: Option<Option<u32>>,
//!     #[serde(default)]
//!     bounds: Option<Bounds>,
//! }
//!
//! let s: Section = serde_json::from_str(r#"{"threshold": false}"#).unwrap();
//! assert_eq!(s.threshold, Some(None)); // turned off
//! let s: Section = serde_json::from_str(r#"{"threshold": 3}"#).unwrap();
//! assert_eq!(s.threshold, Some(Some(3)));
//! let s: Section = serde_json::from_str(r#"{"bounds": {"idle_timeout": "1m"}}"#).unwrap();
//! assert_eq!(s.threshold, None); // unset: the builder's default
//! assert_eq!(s.bounds, Some(Bounds::default().idle_timeout(Some(Duration::from_secs(60)))));
//! let s: Section = serde_json::from_str(r#"{"bounds": {"idle_timeout": false}}"#).unwrap();
//! assert_eq!(s.bounds.unwrap().idle_timeout, None); // never evicts
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, IntoDeserializer, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value, or `false` for none.
struct OffOr<T>(Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OffOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OffOrVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> OffOrVisitor<T> {
            fn value<E: de::Error>(result: Result<T, E>) -> Result<OffOr<T>, E> {
                result.map(|v| OffOr(Some(v)))
            }
        }

        impl<'de, T: Deserialize<'de>> Visitor<'de> for OffOrVisitor<T> {
            type Value = OffOr<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value, or false to turn it off")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                if v {
                    return Err(E::custom(
                        "expected a value, or false to turn it off (true is neither)",
                    ));
                }
                Ok(OffOr(None))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Self::value(T::deserialize(v.into_deserializer()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Self::value(T::deserialize(v.into_deserializer()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Self::value(T::deserialize(v.into_deserializer()))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Self::value(T::deserialize(v.into_deserializer()))
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(|v| OffOr(Some(v)))
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                T::deserialize(SeqAccessDeserializer::new(seq)).map(|v| OffOr(Some(v)))
            }
        }

        deserializer.deserialize_any(OffOrVisitor(PhantomData))
    }
}

/// A humantime duration.
struct Human(Duration);

impl<'de> Deserialize<'de> for Human {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        humantime_serde::deserialize(deserializer).map(Human)
    }
}

/// `#[serde(with)]` for an `Option<Option<T>>` knob: unset is `None`,
/// `false` is `Some(None)` (turned off), a value is `Some(Some(value))`.
/// Use with `#[serde(default)]`.
pub mod or_off {
    use super::*;

    /// Writes the value, or `false` when turned off.
    pub fn serialize<S: Serializer, T: Serialize>(
        value: &Option<Option<T>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(Some(v)) => v.serialize(serializer),
            Some(None) => serializer.serialize_bool(false),
            None => serializer.serialize_none(),
        }
    }

    /// Reads a value, or `false`.
    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        deserializer: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        OffOr::deserialize(deserializer).map(|v| Some(v.0))
    }
}

/// `#[serde(with)]` for an `Option<Duration>` that is a humantime duration
/// or `false` (`None`).
pub mod duration_or_off {
    use super::*;

    /// Writes the duration, or `false` for `None`.
    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => humantime_serde::serialize(d, serializer),
            None => serializer.serialize_bool(false),
        }
    }

    /// Reads a duration, or `false`.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        OffOr::<Human>::deserialize(deserializer).map(|v| v.0.map(|h| h.0))
    }
}

/// `#[serde(with)]` for an `Option<Option<Duration>>` knob: unset, `false`
/// (turned off) or a humantime duration. Use with `#[serde(default)]`.
pub mod optional_duration_or_off {
    use super::*;

    /// Writes the duration, or `false` when turned off.
    pub fn serialize<S: Serializer>(
        value: &Option<Option<Duration>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(inner) => duration_or_off::serialize(inner, serializer),
            None => serializer.serialize_none(),
        }
    }

    /// Reads a duration, or `false`.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Option<Duration>>, D::Error> {
        duration_or_off::deserialize(deserializer).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Knobs {
        #[serde(default, with = "or_off", skip_serializing_if = "Option::is_none")]
        threshold: Option<Option<f64>>,
        #[serde(
            default,
            with = "optional_duration_or_off",
            skip_serializing_if = "Option::is_none"
        )]
        slow: Option<Option<Duration>>,
    }

    fn read(json: &str) -> Result<Knobs, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn unset_off_and_values_round_trip() {
        for (json, knobs) in [
            (
                "{}",
                Knobs {
                    threshold: None,
                    slow: None,
                },
            ),
            (
                r#"{"threshold":false,"slow":false}"#,
                Knobs {
                    threshold: Some(None),
                    slow: Some(None),
                },
            ),
            (
                r#"{"threshold":0.5,"slow":"2s"}"#,
                Knobs {
                    threshold: Some(Some(0.5)),
                    slow: Some(Some(Duration::from_secs(2))),
                },
            ),
        ] {
            assert_eq!(read(json).unwrap(), knobs, "{json}");
            assert_eq!(serde_json::to_string(&knobs).unwrap(), json);
        }
    }

    #[test]
    fn true_and_wrong_types_are_refused() {
        assert!(read(r#"{"threshold":true}"#).is_err());
        assert!(read(r#"{"threshold":"high"}"#).is_err());
        assert!(read(r#"{"slow":"soon"}"#).is_err());
        assert!(read(r#"{"slow":5}"#).is_err());
    }

    #[test]
    fn bounds_read_partially_over_the_defaults() {
        let bounds: crate::Bounds = serde_json::from_str(r#"{"max_keys":5}"#).unwrap();
        assert_eq!(bounds, crate::Bounds::max_keys(5));
        assert!(serde_json::from_str::<crate::Bounds>(r#"{"max_key":5}"#).is_err());
        let never: crate::Bounds = serde_json::from_str(r#"{"idle_timeout":false}"#).unwrap();
        assert_eq!(never.idle_timeout, None);
        assert_eq!(
            serde_json::to_string(&never).unwrap(),
            r#"{"max_keys":10000,"idle_timeout":false}"#
        );
    }
}
