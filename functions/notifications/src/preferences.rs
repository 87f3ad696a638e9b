//! A recipient's notification preferences: the wire document of
//! `GET`/`PUT /api/realtime/notifications/preferences`, its defaults, and its validation.
//!
//! [`Preferences::parse`] is the edge: it walks the JSON document and returns *every* failing
//! field (`quietHours.start`, `categories.poetry`, `contacts.phone`, `timeZone`, …), so a
//! client fixes a form in one round trip. The serde derives read the same shape (camelCase,
//! unknown fields refused, missing fields take defaults) for documents already stored; they
//! apply the same per-field rules, except the category names, which only `parse` can check
//! against the configured list.
//!
//! Choices where the contract is silent (what a Novu/Knock user expects):
//! - `devices` are shown in `GET` but managed only through `POST`/`DELETE
//!   .../preferences/devices`. A `PUT` may carry them back (a client's GET → edit → PUT round
//!   trip must work), but their content is ignored.
//! - `null` removes a contact (`"contacts": {"phone": null}`); an empty string is refused,
//!   since it is more likely a form bug than an intent.
//! - A digest field that does not apply to its frequency is refused rather than ignored:
//!   `at` on an `hourly` digest (hourly digests go out at :00 local), `weekday` on a `daily` one.
//!   `GET` shows only the fields that apply.
//! - Quiet hours whose `start` equals `end` are an empty window: nothing is held (see
//!   [`crate::quiet_hours`]). To silence a channel all day, switch it off instead.
//! - Time zone names are looked up in the IANA database bundled with jiff (case-insensitive,
//!   links such as `US/Eastern` accepted) and stored under the database's spelling.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use serde::de::{self, DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::model::{DeliveryChannel, DigestFrequency};

/// The categories known when none are configured.
pub const DEFAULT_CATEGORIES: [&str; 8] = [
    "writing",
    "collaboration",
    "publishing",
    "analytics",
    "automation",
    "chat",
    "system",
    "account",
];

/// Default mute window for similar notifications: one hour.
pub const DEFAULT_MUTE_WINDOW_SECONDS: u64 = 3600;
/// Longest mute window a recipient may choose: seven days.
pub const MAX_MUTE_WINDOW_SECONDS: u64 = 7 * 24 * 3600;
/// Longest email address accepted (RFC 5321's path limit less the angle brackets).
pub const MAX_EMAIL_CHARS: usize = 254;

/// One reason a preferences document was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Where, as a dotted path: `quietHours.start`, `categories.poetry`,
    /// `categories.writing.channels.fax`; empty for the document itself.
    pub field: String,
    /// What kind of rule failed: `type`, `format`, `range`, `unknown`, `not_applicable`.
    pub rule: &'static str,
    /// The JSON kind of the offending value (`string`, `integer`, …).
    pub kind: &'static str,
    pub message: String,
}

impl FieldError {
    fn new(field: &str, rule: &'static str, value: &Value, message: impl Into<String>) -> Self {
        FieldError {
            field: field.to_string(),
            rule,
            kind: inkwire_shared::schema::kind_of(value),
            message: message.into(),
        }
    }

    /// The same error in the shape `shared::problem::Problem::validation` lists (the dotted
    /// path becomes a JSON pointer).
    pub fn to_schema_error(&self) -> inkwire_shared::schema::FieldError {
        let pointer: String = if self.field.is_empty() {
            String::new()
        } else {
            self.field
                .split('.')
                .map(|seg| format!("/{}", seg.replace('~', "~0").replace('/', "~1")))
                .collect()
        };
        inkwire_shared::schema::FieldError {
            pointer,
            rule: self.rule.to_string(),
            kind: self.kind.to_string(),
            message: self.message.clone(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Leaf values: time zone, HH:MM, weekday, contacts, mute window

/// An IANA time zone name that exists, with the zone it names.
#[derive(Clone, Debug)]
pub struct ZoneName {
    name: String,
    tz: TimeZone,
}

impl ZoneName {
    pub fn utc() -> Self {
        ZoneName {
            name: "UTC".to_string(),
            tz: TimeZone::UTC,
        }
    }

    /// The zone named `name`; the error names it.
    pub fn parse(name: &str) -> Result<Self, String> {
        let shown: String = name.chars().take(64).collect();
        // Only the characters IANA names use: keeps odd input out of the lookup and the
        // message readable.
        let plausible = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+'));
        let found = if plausible {
            TimeZone::get(name).ok()
        } else {
            None
        };
        match found {
            Some(tz) => Ok(ZoneName {
                name: tz.iana_name().unwrap_or(name).to_string(),
                tz,
            }),
            None => Err(format!(
                "unknown time zone \"{shown}\": expected an IANA name such as \"Europe/London\" \
                 or \"America/New_York\""
            )),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn time_zone(&self) -> &TimeZone {
        &self.tz
    }
}

impl Default for ZoneName {
    fn default() -> Self {
        ZoneName::utc()
    }
}

impl PartialEq for ZoneName {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for ZoneName {}

impl Serialize for ZoneName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

impl<'de> Deserialize<'de> for ZoneName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        ZoneName::parse(&name).map_err(de::Error::custom)
    }
}

/// `HH:MM` (two digits each, 00:00–23:59) as a time of day.
pub fn parse_hhmm(s: &str) -> Result<Time, String> {
    let b = s.as_bytes();
    let digits = |i: usize| b[i].is_ascii_digit();
    if b.len() == 5 && b[2] == b':' && digits(0) && digits(1) && digits(3) && digits(4) {
        let h = (b[0] - b'0') * 10 + (b[1] - b'0');
        let m = (b[3] - b'0') * 10 + (b[4] - b'0');
        if h < 24 && m < 60 {
            return Time::new(h as i8, m as i8, 0, 0).map_err(|e| e.to_string());
        }
    }
    let shown: String = s.chars().take(16).collect();
    Err(format!(
        "\"{shown}\" is not a time of day: expected HH:MM from 00:00 to 23:59"
    ))
}

/// A time of day as `HH:MM` (seconds are never set by [`parse_hhmm`]).
pub fn format_hhmm(t: Time) -> String {
    format!("{:02}:{:02}", t.hour(), t.minute())
}

/// `HH:MM` for serde (`#[serde(with = "hhmm")]`).
pub mod hhmm {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Time, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_hhmm(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Time, D::Error> {
        let s = String::deserialize(d)?;
        parse_hhmm(&s).map_err(de::Error::custom)
    }
}

const WEEKDAYS: [(&str, Weekday); 7] = [
    ("monday", Weekday::Monday),
    ("tuesday", Weekday::Tuesday),
    ("wednesday", Weekday::Wednesday),
    ("thursday", Weekday::Thursday),
    ("friday", Weekday::Friday),
    ("saturday", Weekday::Saturday),
    ("sunday", Weekday::Sunday),
];

/// A weekday by its lowercase English name (`monday`).
pub fn parse_weekday(s: &str) -> Result<Weekday, String> {
    WEEKDAYS
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(_, w)| *w)
        .ok_or_else(|| {
            let shown: String = s.chars().take(16).collect();
            format!("\"{shown}\" is not a weekday: expected monday, tuesday, …, sunday")
        })
}

pub fn weekday_name(w: Weekday) -> &'static str {
    WEEKDAYS
        .iter()
        .find(|(_, d)| *d == w)
        .map_or("monday", |(n, _)| n)
}

#[derive(Deserialize)]
#[serde(transparent)]
struct HhMm(#[serde(with = "hhmm")] Time);

struct WeekdayName(Weekday);

impl<'de> Deserialize<'de> for WeekdayName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_weekday(&s)
            .map(WeekdayName)
            .map_err(de::Error::custom)
    }
}

/// Whether `s` is an E.164 phone number: `+`, then 8–15 digits, the first not 0.
pub fn is_valid_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// Whether `s` looks like an email address a mail server could accept: one `@`, a non-empty
/// local part, a domain with a dot (not at either end, no empty label), no whitespace or
/// control characters, at most 254 characters. Deliverability is the SMTP server's verdict.
pub fn is_plausible_email(s: &str) -> bool {
    if s.is_empty() || s.chars().count() > MAX_EMAIL_CHARS {
        return false;
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let mut parts = s.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
}

fn email_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if is_plausible_email(&s) => Ok(Some(s)),
        Some(s) if s.is_empty() => Err(de::Error::custom(
            "an empty email address: use null to remove it",
        )),
        Some(_) => Err(de::Error::custom(
            "not a plausible email address: expected one @, a non-empty local part, a domain \
             with a dot, no spaces, at most 254 characters",
        )),
    }
}

fn phone_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if is_valid_e164(&s) => Ok(Some(s)),
        Some(s) if s.is_empty() => Err(de::Error::custom(
            "an empty phone number: use null to remove it",
        )),
        Some(_) => Err(de::Error::custom(
            "not an E.164 phone number: expected + and 8 to 15 digits, the first not 0 \
             (e.g. +447700900123)",
        )),
    }
}

fn mute_window_field<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = u64::deserialize(d)?;
    if n > MAX_MUTE_WINDOW_SECONDS {
        return Err(de::Error::custom(format!(
            "{n} seconds is longer than the longest mute window, {MAX_MUTE_WINDOW_SECONDS} \
             (7 days); 0 disables muting"
        )));
    }
    Ok(n)
}

#[derive(Deserialize)]
#[serde(transparent)]
struct MuteWindow(#[serde(deserialize_with = "mute_window_field")] u64);

#[derive(Deserialize)]
#[serde(transparent)]
struct EmailContact(#[serde(deserialize_with = "email_field")] Option<String>);

#[derive(Deserialize)]
#[serde(transparent)]
struct PhoneContact(#[serde(deserialize_with = "phone_field")] Option<String>);

// ---------------------------------------------------------------------------------------
// The document

fn yes() -> bool {
    true
}
fn default_quiet_start() -> Time {
    jiff::civil::time(22, 0, 0, 0)
}
fn default_quiet_end() -> Time {
    jiff::civil::time(8, 0, 0, 0)
}
fn default_mute_window() -> u64 {
    DEFAULT_MUTE_WINDOW_SECONDS
}

/// When external channels stay silent, as local wall-clock times `[start, end)` in the
/// recipient's time zone (default 22:00–08:00, enabled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuietHours {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(with = "hhmm", default = "default_quiet_start")]
    pub start: Time,
    #[serde(with = "hhmm", default = "default_quiet_end")]
    pub end: Time,
}

impl Default for QuietHours {
    fn default() -> Self {
        QuietHours {
            enabled: true,
            start: default_quiet_start(),
            end: default_quiet_end(),
        }
    }
}

/// Per channel on/off for one category (every channel on by default). The wire names are the
/// channels' own (`in_app`, not `inApp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSwitches {
    #[serde(default = "yes")]
    pub in_app: bool,
    #[serde(default = "yes")]
    pub email: bool,
    #[serde(default = "yes")]
    pub sms: bool,
    #[serde(default = "yes")]
    pub push: bool,
}

impl Default for ChannelSwitches {
    fn default() -> Self {
        ChannelSwitches {
            in_app: true,
            email: true,
            sms: true,
            push: true,
        }
    }
}

impl ChannelSwitches {
    pub fn get(&self, channel: DeliveryChannel) -> bool {
        match channel {
            DeliveryChannel::InApp => self.in_app,
            DeliveryChannel::Email => self.email,
            DeliveryChannel::Sms => self.sms,
            DeliveryChannel::Push => self.push,
        }
    }

    pub fn set(&mut self, channel: DeliveryChannel, on: bool) {
        match channel {
            DeliveryChannel::InApp => self.in_app = on,
            DeliveryChannel::Email => self.email = on,
            DeliveryChannel::Sms => self.sms = on,
            DeliveryChannel::Push => self.push = on,
        }
    }
}

/// Default local time of a daily digest.
pub const DEFAULT_DAILY_AT: Time = jiff::civil::time(8, 0, 0, 0);
/// Default local time of a weekly digest.
pub const DEFAULT_WEEKLY_AT: Time = jiff::civil::time(9, 0, 0, 0);
/// Default day of a weekly digest.
pub const DEFAULT_WEEKLY_DAY: Weekday = Weekday::Monday;

/// When a category's digest goes out, in the recipient's time zone. `at` matters only for
/// daily and weekly digests, `weekday` only for weekly ones; the constructors keep the
/// others at fixed values so that equal settings compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestSetting {
    pub frequency: DigestFrequency,
    pub at: Time,
    pub weekday: Weekday,
}

impl DigestSetting {
    pub const fn off() -> Self {
        DigestSetting {
            frequency: DigestFrequency::Off,
            at: Time::midnight(),
            weekday: DEFAULT_WEEKLY_DAY,
        }
    }
    pub const fn hourly() -> Self {
        DigestSetting {
            frequency: DigestFrequency::Hourly,
            ..DigestSetting::off()
        }
    }
    pub const fn daily(at: Time) -> Self {
        DigestSetting {
            frequency: DigestFrequency::Daily,
            at,
            weekday: DEFAULT_WEEKLY_DAY,
        }
    }
    pub const fn weekly(weekday: Weekday, at: Time) -> Self {
        DigestSetting {
            frequency: DigestFrequency::Weekly,
            at,
            weekday,
        }
    }

    pub fn is_on(&self) -> bool {
        self.frequency != DigestFrequency::Off
    }
}

impl Default for DigestSetting {
    fn default() -> Self {
        DigestSetting::off()
    }
}

/// The digest as written: which fields are present matters for validation.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DigestWire {
    #[serde(default = "digest_off")]
    frequency: DigestFrequency,
    #[serde(default, with = "opt_hhmm", skip_serializing_if = "Option::is_none")]
    at: Option<Time>,
    #[serde(default, with = "opt_weekday", skip_serializing_if = "Option::is_none")]
    weekday: Option<Weekday>,
}

fn digest_off() -> DigestFrequency {
    DigestFrequency::Off
}

mod opt_hhmm {
    use super::*;
    pub fn serialize<S: Serializer>(t: &Option<Time>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&format_hhmm(*t)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Time>, D::Error> {
        Ok(Some(HhMm::deserialize(d)?.0))
    }
}

mod opt_weekday {
    use super::*;
    pub fn serialize<S: Serializer>(w: &Option<Weekday>, s: S) -> Result<S::Ok, S::Error> {
        match w {
            Some(w) => s.serialize_str(weekday_name(*w)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Weekday>, D::Error> {
        Ok(Some(WeekdayName::deserialize(d)?.0))
    }
}

/// Where a digest field does not apply to the frequency, the message saying so.
fn digest_field_misfit(frequency: DigestFrequency, field: &str) -> Option<String> {
    use DigestFrequency::*;
    match (field, frequency) {
        ("at", Daily | Weekly) | ("weekday", Weekly) => None,
        ("at", Hourly) => {
            Some("an hourly digest goes out at :00 local time; `at` does not apply".into())
        }
        ("at", Off) => Some("`at` applies only to a daily or weekly digest".into()),
        (_, _) => Some("`weekday` applies only to a weekly digest".into()),
    }
}

impl DigestWire {
    fn resolve(self) -> Result<DigestSetting, (&'static str, String)> {
        if self.at.is_some()
            && let Some(m) = digest_field_misfit(self.frequency, "at")
        {
            return Err(("at", m));
        }
        if self.weekday.is_some()
            && let Some(m) = digest_field_misfit(self.frequency, "weekday")
        {
            return Err(("weekday", m));
        }
        Ok(match self.frequency {
            DigestFrequency::Off => DigestSetting::off(),
            DigestFrequency::Hourly => DigestSetting::hourly(),
            DigestFrequency::Daily => DigestSetting::daily(self.at.unwrap_or(DEFAULT_DAILY_AT)),
            DigestFrequency::Weekly => DigestSetting::weekly(
                self.weekday.unwrap_or(DEFAULT_WEEKLY_DAY),
                self.at.unwrap_or(DEFAULT_WEEKLY_AT),
            ),
        })
    }
}

impl Serialize for DigestSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (at, weekday) = match self.frequency {
            DigestFrequency::Off | DigestFrequency::Hourly => (None, None),
            DigestFrequency::Daily => (Some(self.at), None),
            DigestFrequency::Weekly => (Some(self.at), Some(self.weekday)),
        };
        DigestWire {
            frequency: self.frequency,
            at,
            weekday,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for DigestSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        DigestWire::deserialize(d)?
            .resolve()
            .map_err(|(_, m)| de::Error::custom(m))
    }
}

/// One category's settings: channel switches and digest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CategoryPreferences {
    #[serde(default)]
    pub channels: ChannelSwitches,
    #[serde(default)]
    pub digest: DigestSetting,
}

/// Where external notifications go. `None` = no such contact point.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Contacts {
    #[serde(
        default,
        deserialize_with = "email_field",
        skip_serializing_if = "Option::is_none"
    )]
    pub email: Option<String>,
    /// E.164.
    #[serde(
        default,
        deserialize_with = "phone_field",
        skip_serializing_if = "Option::is_none"
    )]
    pub phone: Option<String>,
}

/// A registered push device: an SNS platform endpoint made for its token. Stored beside the
/// preferences (`inkwire:notify:devices:{userId}`), never set through `PUT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    pub id: String,
    /// The push platform (e.g. `apns`, `fcm`), as registered.
    pub platform: String,
    pub endpoint_arn: String,
    pub created_at: Timestamp,
}

fn ignore_devices<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Device>, D::Error> {
    IgnoredAny::deserialize(d)?;
    Ok(Vec::new())
}

/// A recipient's preferences. `PUT` replaces the whole document; missing fields take the
/// defaults ([`Preferences::default`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Preferences {
    #[serde(default)]
    pub time_zone: ZoneName,
    #[serde(default)]
    pub quiet_hours: QuietHours,
    /// Only categories the recipient changed need be present; others take the defaults.
    #[serde(default)]
    pub categories: BTreeMap<String, CategoryPreferences>,
    /// Seconds during which a notification similar to one sent is not sent again on external
    /// channels; 0 disables muting.
    #[serde(
        default = "default_mute_window",
        deserialize_with = "mute_window_field"
    )]
    pub mute_window_seconds: u64,
    #[serde(default)]
    pub contacts: Contacts,
    /// Shown, never read: see the module doc.
    #[serde(default, deserialize_with = "ignore_devices")]
    pub devices: Vec<Device>,
}

impl Default for Preferences {
    fn default() -> Self {
        Preferences {
            time_zone: ZoneName::utc(),
            quiet_hours: QuietHours::default(),
            categories: BTreeMap::new(),
            mute_window_seconds: DEFAULT_MUTE_WINDOW_SECONDS,
            contacts: Contacts::default(),
            devices: Vec::new(),
        }
    }
}

const TOP_FIELDS: &str =
    "timeZone, quietHours, categories, muteWindowSeconds, contacts, devices (read-only)";

impl Preferences {
    /// Validates a `PUT` body against the contract and the configured categories, returning
    /// every failing field.
    pub fn parse(
        value: Value,
        known_categories: &[String],
    ) -> Result<Preferences, Vec<FieldError>> {
        let mut errors = Vec::new();
        let Some(doc) = object(&mut errors, "", &value, "the preferences document") else {
            return Err(errors);
        };
        let mut prefs = Preferences::default();
        for (key, v) in doc {
            match key.as_str() {
                "timeZone" => {
                    if let Some(z) = leaf::<ZoneName>(&mut errors, "timeZone", v, "format") {
                        prefs.time_zone = z;
                    }
                }
                "quietHours" => prefs.quiet_hours = parse_quiet_hours(&mut errors, v),
                "categories" => {
                    prefs.categories = parse_categories(&mut errors, v, known_categories)
                }
                "muteWindowSeconds" => {
                    if let Some(MuteWindow(n)) = leaf(&mut errors, "muteWindowSeconds", v, "range")
                    {
                        prefs.mute_window_seconds = n;
                    }
                }
                "contacts" => prefs.contacts = parse_contacts(&mut errors, v),
                // Read-only (module doc): accepted so that a GET → PUT round trip works.
                "devices" => {}
                other => errors.push(unknown_field(other, v, TOP_FIELDS)),
            }
        }
        if errors.is_empty() {
            Ok(prefs)
        } else {
            Err(errors)
        }
    }

    /// Whether `channel` is switched on for `category` (unlisted categories: every channel on).
    pub fn channel_enabled(&self, category: &str, channel: DeliveryChannel) -> bool {
        self.categories
            .get(category)
            .is_none_or(|c| c.channels.get(channel))
    }

    /// The digest setting of `category` (`off` unless set).
    pub fn digest_for(&self, category: &str) -> DigestSetting {
        self.categories
            .get(category)
            .map(|c| c.digest)
            .unwrap_or_default()
    }

    /// The recipient's time zone (validated when the document was read).
    pub fn time_zone(&self) -> TimeZone {
        self.time_zone.time_zone().clone()
    }

    /// The same preferences with every known category listed (defaults where unset), as `GET`
    /// shows them so that a client can draw the whole category × channel grid.
    pub fn with_all_categories(mut self, known_categories: &[String]) -> Preferences {
        for c in known_categories {
            self.categories.entry(c.clone()).or_default();
        }
        self
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn clipped(key: &str) -> String {
    key.chars().take(64).collect()
}

fn unknown_field(path_key: &str, value: &Value, expected: &str) -> FieldError {
    FieldError::new(
        &clipped(path_key),
        "unknown",
        value,
        format!("unknown field; expected one of {expected}"),
    )
}

fn object<'a>(
    errors: &mut Vec<FieldError>,
    path: &str,
    v: &'a Value,
    what: &str,
) -> Option<&'a Map<String, Value>> {
    match v {
        Value::Object(m) => Some(m),
        other => {
            errors.push(FieldError::new(
                path,
                "type",
                other,
                format!(
                    "{what} must be a JSON object, not {}",
                    inkwire_shared::schema::kind_of(other)
                ),
            ));
            None
        }
    }
}

/// One value through its serde rules; a wrong type or a failed rule becomes a field error.
fn leaf<T: DeserializeOwned>(
    errors: &mut Vec<FieldError>,
    path: &str,
    v: &Value,
    rule: &'static str,
) -> Option<T> {
    match T::deserialize(v) {
        Ok(t) => Some(t),
        Err(e) => {
            let message = e.to_string();
            let rule = if message.starts_with("invalid type") {
                "type"
            } else {
                rule
            };
            errors.push(FieldError::new(path, rule, v, message));
            None
        }
    }
}

fn parse_quiet_hours(errors: &mut Vec<FieldError>, v: &Value) -> QuietHours {
    let mut qh = QuietHours::default();
    let Some(m) = object(errors, "quietHours", v, "quietHours") else {
        return qh;
    };
    for (key, v) in m {
        let path = join("quietHours", key);
        match key.as_str() {
            "enabled" => {
                if let Some(b) = leaf(errors, &path, v, "type") {
                    qh.enabled = b;
                }
            }
            "start" => {
                if let Some(HhMm(t)) = leaf(errors, &path, v, "format") {
                    qh.start = t;
                }
            }
            "end" => {
                if let Some(HhMm(t)) = leaf(errors, &path, v, "format") {
                    qh.end = t;
                }
            }
            _ => errors.push(unknown_field(&path, v, "enabled, start, end")),
        }
    }
    qh
}

fn parse_categories(
    errors: &mut Vec<FieldError>,
    v: &Value,
    known: &[String],
) -> BTreeMap<String, CategoryPreferences> {
    let mut out = BTreeMap::new();
    let Some(m) = object(errors, "categories", v, "categories") else {
        return out;
    };
    for (name, v) in m {
        let path = join("categories", name);
        if !known.iter().any(|k| k == name) {
            errors.push(FieldError::new(
                &clipped(&path),
                "unknown",
                v,
                format!("unknown category; known categories: {}", known.join(", ")),
            ));
            continue;
        }
        let Some(cm) = object(errors, &path, v, "a category's settings") else {
            continue;
        };
        let mut cat = CategoryPreferences::default();
        for (key, v) in cm {
            let path = join(&path, key);
            match key.as_str() {
                "channels" => cat.channels = parse_channels(errors, &path, v),
                "digest" => cat.digest = parse_digest(errors, &path, v),
                _ => errors.push(unknown_field(&path, v, "channels, digest")),
            }
        }
        out.insert(name.clone(), cat);
    }
    out
}

fn parse_channels(errors: &mut Vec<FieldError>, path: &str, v: &Value) -> ChannelSwitches {
    let mut sw = ChannelSwitches::default();
    let Some(m) = object(errors, path, v, "channels") else {
        return sw;
    };
    for (key, v) in m {
        let path = join(path, key);
        match DeliveryChannel::parse(key) {
            Some(c) => {
                if let Some(on) = leaf(errors, &path, v, "type") {
                    sw.set(c, on);
                }
            }
            None => errors.push(unknown_field(&path, v, "in_app, email, sms, push")),
        }
    }
    sw
}

fn parse_digest(errors: &mut Vec<FieldError>, path: &str, v: &Value) -> DigestSetting {
    let Some(m) = object(errors, path, v, "digest") else {
        return DigestSetting::off();
    };
    let before = errors.len();
    let mut wire = DigestWire {
        frequency: DigestFrequency::Off,
        at: None,
        weekday: None,
    };
    // Whether a frequency was given and valid: a misfit is only reported against a known one.
    let mut frequency_ok = true;
    for (key, v) in m {
        let path = join(path, key);
        match key.as_str() {
            "frequency" => match leaf(errors, &path, v, "enum") {
                Some(f) => wire.frequency = f,
                None => frequency_ok = false,
            },
            "at" => wire.at = leaf::<HhMm>(errors, &path, v, "format").map(|t| t.0),
            "weekday" => wire.weekday = leaf::<WeekdayName>(errors, &path, v, "enum").map(|w| w.0),
            _ => errors.push(unknown_field(&path, v, "frequency, at, weekday")),
        }
    }
    if errors.len() > before && !frequency_ok {
        return DigestSetting::off();
    }
    match wire.resolve() {
        Ok(d) => d,
        Err((field, message)) => {
            let value = m.get(field).unwrap_or(&Value::Null);
            errors.push(FieldError::new(
                &join(path, field),
                "not_applicable",
                value,
                message,
            ));
            DigestSetting::off()
        }
    }
}

fn parse_contacts(errors: &mut Vec<FieldError>, v: &Value) -> Contacts {
    let mut c = Contacts::default();
    let Some(m) = object(errors, "contacts", v, "contacts") else {
        return c;
    };
    for (key, v) in m {
        let path = join("contacts", key);
        match key.as_str() {
            "email" => {
                if let Some(EmailContact(e)) = leaf(errors, &path, v, "format") {
                    c.email = e;
                }
            }
            "phone" => {
                if let Some(PhoneContact(p)) = leaf(errors, &path, v, "format") {
                    c.phone = p;
                }
            }
            _ => errors.push(unknown_field(&path, v, "email, phone")),
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::time;
    use proptest::prelude::*;
    use serde_json::json;

    fn known() -> Vec<String> {
        DEFAULT_CATEGORIES.iter().map(|s| s.to_string()).collect()
    }

    fn parse(v: Value) -> Result<Preferences, Vec<FieldError>> {
        Preferences::parse(v, &known())
    }

    fn fields(v: Value) -> Vec<String> {
        let mut f: Vec<String> = parse(v).unwrap_err().into_iter().map(|e| e.field).collect();
        f.sort();
        f
    }

    #[test]
    fn the_contract_example_parses() {
        let p = parse(json!({
          "timeZone": "Europe/London",
          "quietHours": {"enabled": true, "start": "22:00", "end": "08:00"},
          "categories": {
            "collaboration": {"channels": {"in_app": true, "email": true, "sms": false, "push": true},
                              "digest": {"frequency": "daily", "at": "08:00"}},
            "publishing": {"digest": {"frequency": "weekly", "weekday": "monday", "at": "09:00"}}
          },
          "muteWindowSeconds": 3600,
          "contacts": {"email": "ada@example.com", "phone": "+447700900123"}
        }))
        .unwrap();
        assert_eq!(p.time_zone.name(), "Europe/London");
        assert!(!p.channel_enabled("collaboration", DeliveryChannel::Sms));
        assert!(p.channel_enabled("collaboration", DeliveryChannel::Email));
        assert!(p.channel_enabled("writing", DeliveryChannel::Sms));
        assert_eq!(
            p.digest_for("collaboration"),
            DigestSetting::daily(time(8, 0, 0, 0))
        );
        assert_eq!(
            p.digest_for("publishing"),
            DigestSetting::weekly(Weekday::Monday, time(9, 0, 0, 0))
        );
        assert_eq!(p.digest_for("writing"), DigestSetting::off());
        assert_eq!(p.contacts.phone.as_deref(), Some("+447700900123"));
        assert_eq!(
            p.time_zone().iana_name(),
            Some("Europe/London"),
            "time_zone() gives the zone itself"
        );
    }

    #[test]
    fn an_empty_document_is_all_defaults() {
        let p = parse(json!({})).unwrap();
        assert_eq!(p, Preferences::default());
        assert_eq!(p.time_zone.name(), "UTC");
        assert_eq!(
            p.quiet_hours,
            QuietHours {
                enabled: true,
                start: time(22, 0, 0, 0),
                end: time(8, 0, 0, 0)
            }
        );
        assert_eq!(p.mute_window_seconds, 3600);
        assert_eq!(p.contacts, Contacts::default());
        for c in DEFAULT_CATEGORIES {
            for ch in DeliveryChannel::ALL {
                assert!(p.channel_enabled(c, ch));
            }
            assert_eq!(p.digest_for(c), DigestSetting::off());
        }
    }

    #[test]
    fn missing_fields_inside_objects_take_defaults() {
        let p = parse(json!({
            "quietHours": {"start": "23:30"},
            "categories": {"writing": {"channels": {"email": false}},
                           "chat": {"digest": {"frequency": "daily"}},
                           "system": {"digest": {"frequency": "weekly"}},
                           "account": {"digest": {"frequency": "weekly", "weekday": "friday"}},
                           "analytics": {"digest": {"frequency": "hourly"}}},
            "muteWindowSeconds": 0,
        }))
        .unwrap();
        assert_eq!(p.quiet_hours.start, time(23, 30, 0, 0));
        assert_eq!(p.quiet_hours.end, time(8, 0, 0, 0));
        assert!(p.quiet_hours.enabled);
        assert!(!p.channel_enabled("writing", DeliveryChannel::Email));
        assert!(p.channel_enabled("writing", DeliveryChannel::InApp));
        assert_eq!(p.digest_for("chat"), DigestSetting::daily(time(8, 0, 0, 0)));
        assert_eq!(
            p.digest_for("system"),
            DigestSetting::weekly(Weekday::Monday, time(9, 0, 0, 0))
        );
        assert_eq!(
            p.digest_for("account"),
            DigestSetting::weekly(Weekday::Friday, time(9, 0, 0, 0))
        );
        assert_eq!(p.digest_for("analytics"), DigestSetting::hourly());
        assert_eq!(p.mute_window_seconds, 0);
    }

    #[test]
    fn every_failing_field_is_reported_with_its_path() {
        let errs = fields(json!({
            "timeZone": "Mars/Olympus_Mons",
            "quietHours": {"enabled": "yes", "start": "25:00", "end": "7:5", "length": 3},
            "categories": {
                "poetry": {},
                "writing": {"channels": {"fax": true, "email": 1},
                            "digest": {"frequency": "monthly", "at": "24:00"}},
                "chat": {"digest": {"frequency": "hourly", "at": "08:30"}},
                "system": {"digest": {"frequency": "daily", "weekday": "monday"}},
                "account": {"colour": "red"}
            },
            "muteWindowSeconds": 604801,
            "contacts": {"email": "ada at example.com", "phone": "07700900123", "fax": "1"},
            "theme": "dark"
        }));
        assert_eq!(
            errs,
            vec![
                "categories.account.colour",
                "categories.chat.digest.at",
                "categories.poetry",
                "categories.system.digest.weekday",
                "categories.writing.channels.email",
                "categories.writing.channels.fax",
                "categories.writing.digest.at",
                "categories.writing.digest.frequency",
                "contacts.email",
                "contacts.fax",
                "contacts.phone",
                "muteWindowSeconds",
                "quietHours.enabled",
                "quietHours.end",
                "quietHours.length",
                "quietHours.start",
                "theme",
                "timeZone",
            ]
        );
    }

    #[test]
    fn messages_are_specific() {
        let errs = parse(
            json!({"timeZone": "Mars/Olympus_Mons", "quietHours": {"start": "24:00"},
                                "categories": {"poetry": {}}, "muteWindowSeconds": "3600",
                                "contacts": {"phone": "+44 7700 900123"}}),
        )
        .unwrap_err();
        let msg = |f: &str| {
            errs.iter()
                .find(|e| e.field == f)
                .map(|e| e.message.clone())
                .unwrap_or_else(|| panic!("no error for {f}: {errs:?}"))
        };
        assert!(
            msg("timeZone").contains("Mars/Olympus_Mons"),
            "{}",
            msg("timeZone")
        );
        assert!(msg("quietHours.start").contains("\"24:00\""));
        assert!(msg("quietHours.start").contains("HH:MM"));
        assert!(msg("categories.poetry").contains("unknown category"));
        assert!(msg("categories.poetry").contains("collaboration"));
        // serde's wrong-type error, named by the field.
        let mute = errs
            .iter()
            .find(|e| e.field == "muteWindowSeconds")
            .unwrap();
        assert_eq!(mute.rule, "type");
        assert_eq!(mute.kind, "string");
        assert!(mute.message.contains("invalid type"), "{}", mute.message);
        assert!(msg("contacts.phone").contains("E.164"));
        let tz = errs.iter().find(|e| e.field == "timeZone").unwrap();
        let se = tz.to_schema_error();
        assert_eq!(se.pointer, "/timeZone");
        let start = errs.iter().find(|e| e.field == "quietHours.start").unwrap();
        assert_eq!(start.to_schema_error().pointer, "/quietHours/start");
    }

    #[test]
    fn not_an_object_is_one_error() {
        for v in [json!([]), json!("x"), json!(null), json!(3)] {
            let e = parse(v).unwrap_err();
            assert_eq!(e.len(), 1);
            assert_eq!(e[0].field, "");
            assert_eq!(e[0].rule, "type");
        }
        assert_eq!(fields(json!({"quietHours": []})), vec!["quietHours"]);
        assert_eq!(fields(json!({"categories": "all"})), vec!["categories"]);
        assert_eq!(
            fields(json!({"categories": {"chat": {"digest": 5}}})),
            vec!["categories.chat.digest"]
        );
        assert_eq!(fields(json!({"timeZone": null})), vec!["timeZone"]);
    }

    #[test]
    fn times_of_day() {
        for ok in ["00:00", "23:59", "08:00", "12:30"] {
            assert_eq!(format_hhmm(parse_hhmm(ok).unwrap()), ok);
        }
        for bad in [
            "24:00",
            "25:00",
            "7:5",
            "07:5",
            "7:05",
            "12:60",
            "",
            "12:00:00",
            "ab:cd",
            "12-00",
            " 12:00",
            "１２:００",
            "-1:00",
        ] {
            assert!(parse_hhmm(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn weekdays() {
        for (n, w) in WEEKDAYS {
            assert_eq!(parse_weekday(n).unwrap(), w);
            assert_eq!(weekday_name(w), n);
        }
        assert!(parse_weekday("Monday").is_err());
        assert!(parse_weekday("mon").is_err());
    }

    #[test]
    fn time_zones() {
        for ok in [
            "UTC",
            "Europe/London",
            "America/New_York",
            "Asia/Kathmandu",
            "Pacific/Chatham",
            "Etc/GMT+5",
        ] {
            assert_eq!(ZoneName::parse(ok).unwrap().name(), ok);
        }
        // Case-insensitive lookup, stored under the database's spelling.
        assert_eq!(
            ZoneName::parse("europe/london").unwrap().name(),
            "Europe/London"
        );
        for bad in [
            "",
            "Mars/Base",
            "Europe/London ",
            "../../etc/passwd",
            "+05:00",
            "EST5EDT,M3.2.0,M11.1.0",
        ] {
            let e = ZoneName::parse(bad).unwrap_err();
            assert!(e.contains("unknown time zone"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn phone_numbers() {
        for ok in [
            "+447700900123",
            "+12025550123",
            "+49301234",
            "+123456789012345",
        ] {
            assert!(is_valid_e164(ok), "{ok}");
        }
        for bad in [
            "447700900123",
            "+0447700900123",
            "+4477",
            "+1234567",
            "+1234567890123456",
            "+44 7700 900123",
            "+44-7700-900123",
            "",
            "+",
            "+４４7700900123",
        ] {
            assert!(!is_valid_e164(bad), "{bad}");
        }
    }

    #[test]
    fn email_addresses() {
        for ok in [
            "ada@example.com",
            "a.b+tag@mail.example.co.uk",
            "x@y.z",
            "\"odd\"@example.org",
        ] {
            assert!(is_plausible_email(ok), "{ok}");
        }
        let long = format!("{}@example.com", "a".repeat(243));
        assert_eq!(long.len(), 255);
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "ada@@example.com",
            "a@b@example.com",
            "ada @example.com",
            "ada@exa mple.com",
            "ada@.example.com",
            "ada@example.com.",
            "ada@example..com",
            "ada@example.com\n",
            long.as_str(),
        ] {
            assert!(!is_plausible_email(bad), "{bad:?}");
        }
        assert!(is_plausible_email(&long[1..]));
    }

    #[test]
    fn contacts_can_be_removed_with_null_not_emptied() {
        let p = parse(json!({"contacts": {"email": null, "phone": null}})).unwrap();
        assert_eq!(p.contacts, Contacts::default());
        assert_eq!(
            fields(json!({"contacts": {"email": "", "phone": ""}})),
            vec!["contacts.email", "contacts.phone"]
        );
    }

    #[test]
    fn devices_are_shown_but_not_settable() {
        let mut p = Preferences::default();
        p.devices.push(Device {
            id: "d-1".into(),
            platform: "fcm".into(),
            endpoint_arn: "arn:aws:sns:us-east-1:123456789012:endpoint/GCM/app/abc".into(),
            created_at: "2026-03-08T07:00:00Z".parse().unwrap(),
        });
        let shown = serde_json::to_value(&p).unwrap();
        assert_eq!(
            shown["devices"],
            json!([{"id": "d-1", "platform": "fcm",
                    "endpointArn": "arn:aws:sns:us-east-1:123456789012:endpoint/GCM/app/abc",
                    "createdAt": "2026-03-08T07:00:00Z"}])
        );
        // The round trip works, and what was sent as devices is not taken.
        let back = parse(shown.clone()).unwrap();
        assert!(back.devices.is_empty());
        let stored: Preferences = serde_json::from_value(shown).unwrap();
        assert!(stored.devices.is_empty());
    }

    #[test]
    fn get_shows_every_known_category_and_only_applicable_digest_fields() {
        let p = parse(
            json!({"categories": {"chat": {"digest": {"frequency": "daily", "at": "07:15"}}}}),
        )
        .unwrap()
        .with_all_categories(&known());
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["categories"].as_object().unwrap().len(), 8);
        assert_eq!(
            v["categories"]["chat"]["digest"],
            json!({"frequency": "daily", "at": "07:15"})
        );
        assert_eq!(
            v["categories"]["writing"]["digest"],
            json!({"frequency": "off"})
        );
        assert_eq!(
            v["categories"]["writing"]["channels"],
            json!({"in_app": true, "email": true, "sms": true, "push": true})
        );
        assert_eq!(v["timeZone"], "UTC");
        assert_eq!(
            v["quietHours"],
            json!({"enabled": true, "start": "22:00", "end": "08:00"})
        );
        assert_eq!(v["muteWindowSeconds"], 3600);
        assert_eq!(v["contacts"], json!({}));
    }

    fn arb_doc() -> impl Strategy<Value = Value> {
        let hhmm = (0u8..24, 0u8..60).prop_map(|(h, m)| json!(format!("{h:02}:{m:02}")));
        let zone = prop::sample::select(vec![
            "UTC",
            "Europe/London",
            "Asia/Kathmandu",
            "Pacific/Chatham",
        ]);
        let digest = prop_oneof![
            Just(json!({"frequency": "off"})),
            Just(json!({"frequency": "hourly"})),
            hhmm.clone()
                .prop_map(|at| json!({"frequency": "daily", "at": at})),
            (
                hhmm.clone(),
                prop::sample::select(WEEKDAYS.iter().map(|w| w.0).collect::<Vec<_>>())
            )
                .prop_map(|(at, d)| json!({"frequency": "weekly", "at": at, "weekday": d})),
        ];
        let category = (any::<[bool; 4]>(), digest).prop_map(|(c, d)| {
            json!({"channels": {"in_app": c[0], "email": c[1], "sms": c[2], "push": c[3]}, "digest": d})
        });
        let categories = prop::collection::btree_map(
            prop::sample::select(DEFAULT_CATEGORIES.to_vec()).prop_map(String::from),
            category,
            0..4,
        );
        (
            zone,
            any::<bool>(),
            hhmm.clone(),
            hhmm,
            categories,
            0u64..=MAX_MUTE_WINDOW_SECONDS,
        )
            .prop_map(|(z, en, s, e, cats, mute)| {
                json!({"timeZone": z, "quietHours": {"enabled": en, "start": s, "end": e},
                       "categories": cats, "muteWindowSeconds": mute,
                       "contacts": {"email": "ada@example.com"}})
            })
    }

    proptest! {
        /// What `parse` accepts, serde reads the same way, and what is shown reads back equal.
        #[test]
        fn parse_serde_and_display_agree(doc in arb_doc()) {
            let parsed = parse(doc.clone()).unwrap();
            let via_serde: Preferences = serde_json::from_value(doc).unwrap();
            prop_assert_eq!(&parsed, &via_serde);
            let shown = serde_json::to_value(&parsed).unwrap();
            prop_assert_eq!(parse(shown).unwrap(), parsed);
        }

        /// Breaking one field is reported on that field and nowhere else, and serde refuses
        /// the document too.
        #[test]
        fn one_broken_field_is_one_error(doc in arb_doc(), which in 0usize..5) {
            let mut doc = doc;
            let (field, bad) = match which {
                0 => ("timeZone", json!("Nowhere/Land")),
                1 => ("quietHours.end", json!("24:00")),
                2 => ("muteWindowSeconds", json!(-1)),
                3 => ("contacts.phone", json!("12345")),
                _ => ("quietHours.enabled", json!(1)),
            };
            let mut slot = &mut doc;
            for seg in field.split('.') {
                slot = &mut slot[seg];
            }
            *slot = bad;
            let errs = parse(doc.clone()).unwrap_err();
            prop_assert_eq!(errs.len(), 1);
            prop_assert_eq!(&errs[0].field, field);
            prop_assert!(serde_json::from_value::<Preferences>(doc).is_err());
        }
    }
}
