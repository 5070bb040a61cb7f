//! Plain-Rust helpers shared by the segs rule plugins (guests).
//!
//! Nothing here depends on WIT or Wasm: the guest crates convert the
//! generated WIT types into these ones at their boundary, so the rule logic
//! and these helpers stay testable natively with `cargo test`.
//!
//! * [`ConfigValue`] mirrors the WIT `config-value` variant.
//! * [`ConfigReader`] reads a plugin's `(key, value)` config pairs against the
//!   keys the plugin declares, with defaults, type checks and range checks;
//!   every error message names the offending key.
//! * [`Severity`] mirrors the WIT `severity` enum.
//! * [`guest_config!`] generates a guest's config plumbing (storing what
//!   `configure` was given, reading it back) from the wit-bindgen types.
//! * `vectors` (a module behind the feature `vectors`) loads a plugin's
//!   `vectors.json` and checks its bad configs, for the plugin's native
//!   tests.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

/// One value of a plugin's config table (mirror of WIT `config-value`).
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigValue {
    Float(f64),
    Integer(i64),
    Boolean(bool),
    Text(String),
}

impl fmt::Display for ConfigValue {
    /// Describes the value with its type, for error messages:
    /// `float 1.5`, `integer 3`, `boolean true`, `text "abc"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::Float(v) => write!(f, "float {v}"),
            ConfigValue::Integer(v) => write!(f, "integer {v}"),
            ConfigValue::Boolean(v) => write!(f, "boolean {v}"),
            ConfigValue::Text(v) => write!(f, "text {v:?}"),
        }
    }
}

/// Builds the error message for `key`: ``config key `key`: reason``.
///
/// Plugins use it for checks that span several keys, e.g.
/// `invalid("spike_high_threshold", "must be >= spike_threshold (1)")`.
pub fn invalid(key: &str, reason: impl fmt::Display) -> String {
    format!("config key `{key}`: {reason}")
}

/// Reads a plugin's config pairs against the keys the plugin declares.
///
/// Each typed getter declares one known key and returns its value, or the
/// default when the key is absent. [`ConfigReader::finish`] then refuses any
/// key that no getter declared (typically a typo), listing the known keys.
///
/// ```
/// use segs_plugin_sdk::{ConfigReader, ConfigValue};
///
/// let pairs = vec![("spike_threshold".to_string(), ConfigValue::Integer(2))];
/// let mut r = ConfigReader::new(&pairs);
/// let spike = r.f64("spike_threshold", 1.0).unwrap();
/// let min = r.u32_in("min_sample_size", 10, 0..=u32::MAX).unwrap();
/// r.finish().unwrap();
/// assert_eq!((spike, min), (2.0, 10));
/// ```
#[derive(Debug)]
pub struct ConfigReader<'a> {
    pairs: &'a [(String, ConfigValue)],
    known: Vec<&'static str>,
}

impl<'a> ConfigReader<'a> {
    /// A reader over `pairs`, the config table in file order.
    #[must_use = "call the getters, then `finish` to refuse unknown keys"]
    pub fn new(pairs: &'a [(String, ConfigValue)]) -> Self {
        Self {
            pairs,
            known: Vec::new(),
        }
    }

    /// Declares `key` and returns its value if present.
    ///
    /// A key given more than once is refused rather than silently picking
    /// one of the values.
    fn lookup(&mut self, key: &'static str) -> Result<Option<&'a ConfigValue>, String> {
        if !self.known.contains(&key) {
            self.known.push(key);
        }
        let mut found = self.pairs.iter().filter(|(k, _)| k == key);
        match (found.next(), found.next()) {
            (None, _) => Ok(None),
            (Some((_, v)), None) => Ok(Some(v)),
            (Some(_), Some(_)) => Err(invalid(key, "given more than once")),
        }
    }

    /// A finite number. Integers are accepted (and converted); NaN and
    /// infinities are refused since no threshold is meaningful with them.
    pub fn f64(&mut self, key: &'static str, default: f64) -> Result<f64, String> {
        let value = match self.lookup(key)? {
            None => return Ok(default),
            Some(ConfigValue::Float(v)) => *v,
            // Config integers are small in practice; the rounding of huge
            // ones to the nearest f64 is harmless for a threshold.
            Some(ConfigValue::Integer(v)) => *v as f64,
            Some(other) => return Err(invalid(key, format!("expected a number, got {other}"))),
        };
        if value.is_finite() {
            Ok(value)
        } else {
            Err(invalid(
                key,
                format!("must be a finite number, got {value}"),
            ))
        }
    }

    /// A finite number that must be `>= min`.
    pub fn f64_at_least(
        &mut self,
        key: &'static str,
        default: f64,
        min: f64,
    ) -> Result<f64, String> {
        let value = self.f64(key, default)?;
        if value >= min {
            Ok(value)
        } else {
            Err(invalid(key, format!("must be >= {min}, got {value}")))
        }
    }

    /// A finite number that must be strictly positive.
    pub fn f64_positive(&mut self, key: &'static str, default: f64) -> Result<f64, String> {
        let value = self.f64(key, default)?;
        if value > 0.0 {
            Ok(value)
        } else {
            Err(invalid(key, format!("must be > 0, got {value}")))
        }
    }

    /// An integer. Floats are refused, even integral ones (`10.0`), so that
    /// a count never silently comes from a fractional value.
    pub fn i64(&mut self, key: &'static str, default: i64) -> Result<i64, String> {
        match self.lookup(key)? {
            None => Ok(default),
            Some(ConfigValue::Integer(v)) => Ok(*v),
            Some(other) => Err(invalid(key, format!("expected an integer, got {other}"))),
        }
    }

    /// An integer within `range` (inclusive).
    pub fn i64_in(
        &mut self,
        key: &'static str,
        default: i64,
        range: RangeInclusive<i64>,
    ) -> Result<i64, String> {
        self.integer_in(key, default, range, i64::MAX)
    }

    /// An integer within `range` (inclusive), as a `u32`.
    pub fn u32_in(
        &mut self,
        key: &'static str,
        default: u32,
        range: RangeInclusive<u32>,
    ) -> Result<u32, String> {
        let wide = i64::from(*range.start())..=i64::from(*range.end());
        let value = self.integer_in(key, i64::from(default), wide, i64::from(u32::MAX))?;
        // Checked against a sub-range of u32 just above.
        Ok(u32::try_from(value).expect("checked against a u32 range"))
    }

    /// An integer within `range`. An upper end equal to `type_max` (the
    /// maximum of the target type) is left out of the message: "must be
    /// >= 1" rather than "must be between 1 and 4294967295".
    fn integer_in(
        &mut self,
        key: &'static str,
        default: i64,
        range: RangeInclusive<i64>,
        type_max: i64,
    ) -> Result<i64, String> {
        let value = self.i64(key, default)?;
        if range.contains(&value) {
            return Ok(value);
        }
        let (lo, hi) = (*range.start(), *range.end());
        let bound = if hi == type_max {
            if value < lo {
                format!("must be >= {lo}")
            } else {
                format!("must be <= {hi}")
            }
        } else if lo == i64::MIN {
            format!("must be <= {hi}")
        } else {
            format!("must be between {lo} and {hi}")
        };
        Err(invalid(key, format!("{bound}, got {value}")))
    }

    /// A boolean.
    pub fn bool(&mut self, key: &'static str, default: bool) -> Result<bool, String> {
        match self.lookup(key)? {
            None => Ok(default),
            Some(ConfigValue::Boolean(v)) => Ok(*v),
            Some(other) => Err(invalid(key, format!("expected a boolean, got {other}"))),
        }
    }

    /// A string.
    pub fn text(&mut self, key: &'static str, default: &str) -> Result<String, String> {
        match self.lookup(key)? {
            None => Ok(default.to_owned()),
            Some(ConfigValue::Text(v)) => Ok(v.clone()),
            Some(other) => Err(invalid(key, format!("expected a string, got {other}"))),
        }
    }

    /// Refuses the first key (in file order) that no getter declared.
    pub fn finish(self) -> Result<(), String> {
        match self
            .pairs
            .iter()
            .find(|(k, _)| !self.known.contains(&k.as_str()))
        {
            None => Ok(()),
            Some((key, _)) => Err(format!(
                "unknown config key `{key}` (known keys: {})",
                self.known.join(", ")
            )),
        }
    }
}

#[cfg(feature = "vectors")]
pub mod vectors;

/// Generates the config plumbing of a guest's wit-bindgen glue.
///
/// `guest_config!(Config, WitConfigValue)`, where `Config` is the rule's
/// config type and `WitConfigValue` the path (`a::b::C`, no generics) of the
/// WIT `config-value` variant as wit-bindgen generated it, expands to:
///
/// * `static CONFIG`, the config stored by the last successful
///   `set_config` (`None` before: the defaults);
/// * `fn config() -> Config`: that config, or `Config::default()`;
/// * `fn set_config(pairs: Vec<(String, WitConfigValue)>) -> Result<(), String>`:
///   converts the pairs to [`ConfigValue`]s, parses them with
///   `Config::from_pairs` and stores the result. A refused config returns
///   the parser's message and leaves the stored config as it was.
///
/// `Config` must be `Clone + Default + Send` and have
/// `fn from_pairs(&[(String, ConfigValue)]) -> Result<Config, String>`.
/// A guest's `configure` export is then `set_config(config)`, and each
/// entry point starts with `let config = config();`:
///
/// ```
/// use segs_plugin_sdk::{ConfigReader, ConfigValue};
///
/// // Stand-ins for the type wit-bindgen generates and for the rule's config.
/// enum WitConfigValue { Float(f64), Integer(i64), Boolean(bool), Text(String) }
///
/// #[derive(Debug, Clone, PartialEq)]
/// struct Config { n: i64 }
///
/// impl Default for Config {
///     fn default() -> Self { Config { n: 1 } }
/// }
///
/// impl Config {
///     fn from_pairs(pairs: &[(String, ConfigValue)]) -> Result<Self, String> {
///         let mut r = ConfigReader::new(pairs);
///         let n = r.i64("n", Self::default().n)?;
///         r.finish()?;
///         Ok(Config { n })
///     }
/// }
///
/// segs_plugin_sdk::guest_config!(Config, WitConfigValue);
///
/// assert_eq!(config(), Config { n: 1 });
/// set_config(vec![("n".to_owned(), WitConfigValue::Integer(2))]).unwrap();
/// assert_eq!(config(), Config { n: 2 });
/// let refused = set_config(vec![("n".to_owned(), WitConfigValue::Boolean(true))]);
/// assert_eq!(
///     refused,
///     Err("config key `n`: expected an integer, got boolean true".to_owned())
/// );
/// assert_eq!(config(), Config { n: 2 });
/// ```
#[macro_export]
macro_rules! guest_config {
    ($config:ty, $($wit_config_value:ident)::+ $(,)?) => {
        /// The config set by the last successful `configure`; `None` means
        /// defaults.
        static CONFIG: ::std::sync::Mutex<::std::option::Option<$config>> =
            ::std::sync::Mutex::new(::std::option::Option::None);

        /// The config set by the last successful `configure`, or the
        /// defaults.
        fn config() -> $config {
            CONFIG
                .lock()
                .unwrap_or_else(::std::sync::PoisonError::into_inner)
                .clone()
                .unwrap_or_default()
        }

        /// Converts, parses and stores the config given to `configure`; a
        /// refused one leaves the stored config as it was.
        fn set_config(
            pairs: ::std::vec::Vec<(::std::string::String, $($wit_config_value)::+)>,
        ) -> ::std::result::Result<(), ::std::string::String> {
            let pairs: ::std::vec::Vec<_> = pairs
                .into_iter()
                .map(|(key, value)| {
                    let value = match value {
                        $($wit_config_value)::+::Float(v) => $crate::ConfigValue::Float(v),
                        $($wit_config_value)::+::Integer(v) => $crate::ConfigValue::Integer(v),
                        $($wit_config_value)::+::Boolean(v) => $crate::ConfigValue::Boolean(v),
                        $($wit_config_value)::+::Text(v) => $crate::ConfigValue::Text(v),
                    };
                    (key, value)
                })
                .collect();
            let parsed = <$config>::from_pairs(&pairs)?;
            *CONFIG
                .lock()
                .unwrap_or_else(::std::sync::PoisonError::into_inner) =
                ::std::option::Option::Some(parsed);
            ::std::result::Result::Ok(())
        }
    };
}

/// How serious a finding is (mirror of WIT `severity`), least serious first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// The lower-case name used in alerts: `low`, `medium`, `high`, `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = String;

    /// Parses the lower-case name written by [`Severity::as_str`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "low" => Ok(Severity::Low),
            "medium" => Ok(Severity::Medium),
            "high" => Ok(Severity::High),
            "critical" => Ok(Severity::Critical),
            other => Err(format!("unknown severity {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, ConfigValue)]) -> Vec<(String, ConfigValue)> {
        items
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn defaults_when_absent() {
        let p = pairs(&[]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(r.f64("a", 1.5), Ok(1.5));
        assert_eq!(r.i64("b", -3), Ok(-3));
        assert_eq!(r.u32_in("c", 7, 0..=u32::MAX), Ok(7));
        assert_eq!(r.bool("d", true), Ok(true));
        assert_eq!(r.text("e", "x"), Ok("x".to_owned()));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn reads_given_values() {
        let p = pairs(&[
            ("a", ConfigValue::Float(0.25)),
            ("b", ConfigValue::Integer(42)),
            ("d", ConfigValue::Boolean(false)),
            ("e", ConfigValue::Text("hi".into())),
        ]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(r.f64("a", 1.0), Ok(0.25));
        assert_eq!(r.i64("b", 0), Ok(42));
        assert_eq!(r.bool("d", true), Ok(false));
        assert_eq!(r.text("e", ""), Ok("hi".to_owned()));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn integer_accepted_as_float() {
        let p = pairs(&[("spike_threshold", ConfigValue::Integer(2))]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(r.f64("spike_threshold", 1.0), Ok(2.0));
    }

    #[test]
    fn float_refused_as_integer() {
        let p = pairs(&[("min_sample_size", ConfigValue::Float(10.0))]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(
            r.i64("min_sample_size", 10),
            Err("config key `min_sample_size`: expected an integer, got float 10".to_owned())
        );
    }

    #[test]
    fn wrong_type_names_key_and_value() {
        let p = pairs(&[("spike_threshold", ConfigValue::Text("abc".into()))]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(
            r.f64("spike_threshold", 1.0),
            Err(r#"config key `spike_threshold`: expected a number, got text "abc""#.to_owned())
        );
        let p = pairs(&[("flag", ConfigValue::Integer(1))]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(
            r.bool("flag", false),
            Err("config key `flag`: expected a boolean, got integer 1".to_owned())
        );
        let p = pairs(&[("name", ConfigValue::Boolean(true))]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(
            r.text("name", ""),
            Err("config key `name`: expected a string, got boolean true".to_owned())
        );
    }

    #[test]
    fn non_finite_float_refused() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let p = pairs(&[("x", ConfigValue::Float(v))]);
            let mut r = ConfigReader::new(&p);
            let err = r.f64("x", 1.0).unwrap_err();
            assert!(
                err.starts_with("config key `x`: must be a finite number"),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_key_lists_known_keys() {
        let p = pairs(&[
            ("spike_threshold", ConfigValue::Float(1.0)),
            ("spike_treshold", ConfigValue::Float(1.0)),
        ]);
        let mut r = ConfigReader::new(&p);
        r.f64("spike_threshold", 1.0).unwrap();
        r.u32_in("min_sample_size", 10, 0..=u32::MAX).unwrap();
        assert_eq!(
            r.finish(),
            Err("unknown config key `spike_treshold` \
                 (known keys: spike_threshold, min_sample_size)"
                .to_owned())
        );
    }

    #[test]
    fn duplicate_key_refused() {
        let p = pairs(&[
            ("a", ConfigValue::Integer(1)),
            ("a", ConfigValue::Integer(2)),
        ]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(
            r.i64("a", 0),
            Err("config key `a`: given more than once".to_owned())
        );
    }

    #[test]
    fn range_checks() {
        let p = pairs(&[("min_sample_size", ConfigValue::Integer(-1))]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(
            r.i64_in("min_sample_size", 10, 0..=i64::MAX),
            Err("config key `min_sample_size`: must be >= 0, got -1".to_owned())
        );

        let p = pairs(&[("decimals", ConfigValue::Integer(10))]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(
            r.u32_in("decimals", 3, 0..=9),
            Err("config key `decimals`: must be between 0 and 9, got 10".to_owned())
        );

        let p = pairs(&[("n", ConfigValue::Integer(i64::from(u32::MAX) + 1))]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(
            r.u32_in("n", 1, 1..=u32::MAX),
            Err("config key `n`: must be <= 4294967295, got 4294967296".to_owned())
        );

        let p = pairs(&[("n", ConfigValue::Integer(0))]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(
            r.u32_in("n", 1, 1..=u32::MAX),
            Err("config key `n`: must be >= 1, got 0".to_owned())
        );

        let p = pairs(&[("m", ConfigValue::Float(0.0))]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(
            r.f64_positive("m", 1.0),
            Err("config key `m`: must be > 0, got 0".to_owned())
        );

        let p = pairs(&[("t", ConfigValue::Float(-0.5))]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(
            r.f64_at_least("t", 1.0, 0.0),
            Err("config key `t`: must be >= 0, got -0.5".to_owned())
        );
    }

    #[test]
    fn in_range_values_pass() {
        let p = pairs(&[
            ("d", ConfigValue::Integer(9)),
            ("m", ConfigValue::Float(0.01)),
            ("t", ConfigValue::Integer(0)),
        ]);
        let mut r = ConfigReader::new(&p);
        assert_eq!(r.u32_in("d", 3, 0..=9), Ok(9));
        assert_eq!(r.f64_positive("m", 1.0), Ok(0.01));
        assert_eq!(r.f64_at_least("t", 1.0, 0.0), Ok(0.0));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn config_value_display() {
        assert_eq!(ConfigValue::Float(1.5).to_string(), "float 1.5");
        assert_eq!(ConfigValue::Integer(-2).to_string(), "integer -2");
        assert_eq!(ConfigValue::Boolean(true).to_string(), "boolean true");
        assert_eq!(
            ConfigValue::Text("a\"b".into()).to_string(),
            r#"text "a\"b""#
        );
    }

    /// `guest_config!` converts every variant, in order.
    #[test]
    fn guest_config_converts_values() {
        enum Wit {
            Float(f64),
            Integer(i64),
            Boolean(bool),
            Text(String),
        }

        #[derive(Debug, Clone, Default, PartialEq)]
        struct Pairs(Vec<(String, ConfigValue)>);

        impl Pairs {
            fn from_pairs(pairs: &[(String, ConfigValue)]) -> Result<Self, String> {
                Ok(Pairs(pairs.to_vec()))
            }
        }

        guest_config!(Pairs, Wit);

        assert_eq!(config(), Pairs::default());
        set_config(vec![
            ("t".into(), Wit::Text("x".into())),
            ("f".into(), Wit::Float(0.5)),
            ("i".into(), Wit::Integer(-3)),
            ("b".into(), Wit::Boolean(true)),
        ])
        .unwrap();
        assert_eq!(
            config(),
            Pairs(pairs(&[
                ("t", ConfigValue::Text("x".into())),
                ("f", ConfigValue::Float(0.5)),
                ("i", ConfigValue::Integer(-3)),
                ("b", ConfigValue::Boolean(true)),
            ]))
        );
    }

    #[test]
    fn severity_names_round_trip() {
        for s in [
            Severity::Low,
            Severity::Medium,
            Severity::High,
            Severity::Critical,
        ] {
            assert_eq!(s.as_str().parse::<Severity>(), Ok(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert!("severe".parse::<Severity>().is_err());
        assert!(Severity::Low < Severity::Critical);
    }
}
