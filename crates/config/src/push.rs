//! `[push]` and `[metrics]`: the monitoring channels besides mail.
//!
//! `[push]` is healthchecks-style pings per profile and drive (`/start`,
//! the bare URL for success, `/fail`, `/log`) and an ntfy topic told about
//! failures. ferry-notifier spools them in their own durable outbox and
//! retries them like mail. `[metrics]` names the Prometheus textfile the
//! notifier rewrites after every change (node_exporter's textfile
//! collector reads it).
//!
//! URLs are checked here so a typo is a config error, not a dead letter:
//! `https://` anywhere, plain `http://` only to a loopback host (a ping URL
//! is a secret of its own: whoever knows it can fake a success). The ntfy
//! access token never sits in ferry.toml: it comes from a file (root,
//! 0600) or a systemd credential, read for each delivery pass.

use serde::Deserialize;
use std::collections::BTreeMap;

use crate::notify::{check_credential_name, is_loopback_host};
use crate::{AbsolutePath, Config, Name};

/// `[push]`: pings and ntfy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Push {
    /// Connect and whole-request timeout, 1 to 60 seconds. Default 10.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// The first retry after a temporary failure. Default 60; it doubles
    /// up to `retry-max-seconds`.
    #[serde(default = "default_retry_min")]
    pub retry_min_seconds: u64,
    /// The longest wait between retries. Default 3600.
    #[serde(default = "default_retry_max")]
    pub retry_max_seconds: u64,
    /// A file holding the healthchecks project's ping key (root, mode
    /// 0600); it replaces `{ping-key}` in the ping URLs when they are sent,
    /// so ferry.toml (readable by every local user) holds no URL that
    /// could fake a ping.
    pub ping_key_file: Option<AbsolutePath>,
    /// The name of a systemd credential holding the ping key (the unit
    /// loads `ferry-ping-key` from /etc/credstore); not with `ping-key-file`.
    pub ping_key_credential: Option<String>,
    /// Ping URL per backup profile (healthchecks protocol), e.g.
    /// `https://hc-ping.com/{ping-key}/nas-backup`.
    #[serde(default)]
    pub profiles: BTreeMap<Name, String>,
    /// Ping URL per drive (healthchecks protocol).
    #[serde(default)]
    pub drives: BTreeMap<Name, String>,
    /// An ntfy topic told about every failure.
    pub ntfy: Option<Ntfy>,
}

/// The placeholder for the ping key in ping URLs.
pub const PING_KEY: &str = "{ping-key}";

/// `[push.ntfy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Ntfy {
    /// The topic URL, e.g. `https://ntfy.sh/ferry-nas`.
    pub url: String,
    /// A file holding the access token (root, mode 0600).
    pub token_file: Option<AbsolutePath>,
    /// The name of a systemd credential holding the access token (the
    /// installed unit loads `ferry-ntfy-token` from /etc/credstore); not
    /// with `token-file`.
    pub token_credential: Option<String>,
    /// ntfy's priority: min, low, default, high (default) or urgent.
    #[serde(default)]
    pub priority: NtfyPriority,
    /// ntfy tags (emoji short codes or words). Default `["warning"]`.
    #[serde(default = "default_tags")]
    pub tags: Vec<String>,
}

/// ntfy's priorities, by its names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NtfyPriority {
    /// 1.
    Min,
    /// 2.
    Low,
    /// 3.
    Default,
    /// 4.
    #[default]
    High,
    /// 5.
    Urgent,
}

impl NtfyPriority {
    /// The word ntfy's `Priority` header takes.
    pub fn as_str(self) -> &'static str {
        match self {
            NtfyPriority::Min => "min",
            NtfyPriority::Low => "low",
            NtfyPriority::Default => "default",
            NtfyPriority::High => "high",
            NtfyPriority::Urgent => "urgent",
        }
    }
}

/// `[metrics]`: the Prometheus textfile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Metrics {
    /// The file written (atomically, mode 0644), in node_exporter's
    /// `--collector.textfile.directory`; it must end in `.prom`. Debian's
    /// prometheus-node-exporter reads /var/lib/prometheus/node-exporter.
    pub textfile: AbsolutePath,
}

fn default_timeout() -> u64 {
    10
}
fn default_retry_min() -> u64 {
    60
}
fn default_retry_max() -> u64 {
    3600
}
fn default_tags() -> Vec<String> {
    vec!["warning".into()]
}

/// An `https://` URL, or `http://` to a loopback host; no user info, no
/// query or fragment (ferry appends `/start`, `/fail`), no spaces.
pub fn check_url(url: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("`{}` {why}", url.escape_debug()));
    let (secure, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return bad("is not an http(s) URL: write it as https://host/path");
    };
    if !url.chars().all(|c| c.is_ascii_graphic()) {
        return bad("has spaces or characters a URL cannot hold");
    }
    if url.contains(['?', '#']) {
        return bad("has a query or fragment; ferry appends /start, /fail and /log to the URL");
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return bad("needs a host and no user name or password in it");
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, port)) => (ip, port.strip_prefix(':')),
            None => return bad("has an unclosed [ in its host"),
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return bad("has a port that is not a number");
    }
    if !secure && !is_loopback_host(host) {
        return bad(
            "is plain http to another machine; use https:// (http is only allowed to localhost)",
        );
    }
    Ok(())
}

type Mistake = (Vec<String>, String);

/// `push.<k>…` as a key path.
fn key(k: &[&str]) -> Vec<String> {
    std::iter::once("push")
        .chain(k.iter().copied())
        .map(str::to_string)
        .collect()
}

/// A secret given as a file or a credential, not both; a valid name.
fn check_secret(
    file: bool,
    credential: Option<&str>,
    names: (&str, &str),
    path: &[&str],
) -> Result<(), Mistake> {
    let Some(name) = credential else {
        return Ok(());
    };
    let (what, example) = names;
    if file {
        return Err((
            key(path),
            format!("give the {what} either as a file or as a credential, not both"),
        ));
    }
    if !check_credential_name(name) {
        return Err((
            key(path),
            format!("a credential name is letters, digits and - _ . @, for example \"{example}\""),
        ));
    }
    Ok(())
}

/// Each ping URL names a configured profile or drive, is a valid URL, and
/// uses `{ping-key}` only when there is a key to fill in.
fn check_pings(config: &Config, push: &Push) -> Result<(), Mistake> {
    let keyed = push.ping_key_file.is_some() || push.ping_key_credential.is_some();
    let checks = push
        .profiles
        .iter()
        .map(|(n, u)| ("profiles", "profile", config.profiles.contains_key(n), n, u))
        .chain(
            push.drives
                .iter()
                .map(|(n, u)| ("drives", "drive", config.drives.contains_key(n), n, u)),
        );
    for (table, word, known, name, url) in checks {
        let here = key(&[table, name.as_str()]);
        if !known {
            return Err((
                here,
                format!(
                    "no {word} named `{name}`: add a [{table}.{name}] section or remove it here"
                ),
            ));
        }
        if url.contains(PING_KEY) && !keyed {
            return Err((
                here,
                format!("uses {PING_KEY} but [push] has no ping-key-file or ping-key-credential to fill it in"),
            ));
        }
        check_url(url).map_err(|e| (here, e))?;
    }
    Ok(())
}

fn check_ntfy(ntfy: &Ntfy) -> Result<(), Mistake> {
    check_url(&ntfy.url).map_err(|e| (key(&["ntfy", "url"]), e))?;
    check_secret(
        ntfy.token_file.is_some(),
        ntfy.token_credential.as_deref(),
        ("token", "ferry-ntfy-token"),
        &["ntfy", "token-credential"],
    )?;
    for tag in &ntfy.tags {
        if tag.is_empty() || tag.contains(',') || !tag.chars().all(|c| c.is_ascii_graphic()) {
            return Err((
                key(&["ntfy", "tags"]),
                format!(
                    "`{}` is not a tag: one word of printable ASCII without commas, e.g. \"warning\"",
                    tag.escape_debug()
                ),
            ));
        }
    }
    Ok(())
}

/// Checks that need the whole configuration.
pub(crate) fn check(config: &Config) -> Result<(), Mistake> {
    if let Some(metrics) = &config.metrics {
        if metrics.textfile.extension().is_none_or(|e| e != "prom") {
            return Err((
                vec!["metrics".into(), "textfile".into()],
                "node_exporter only reads files ending in .prom, for example /var/lib/prometheus/node-exporter/ferry.prom".into(),
            ));
        }
    }
    let Some(push) = &config.push else {
        return Ok(());
    };
    if !(1..=60).contains(&push.timeout_seconds) {
        return Err((
            key(&["timeout-seconds"]),
            "must be from 1 to 60 seconds".into(),
        ));
    }
    if push.retry_min_seconds == 0 {
        return Err((key(&["retry-min-seconds"]), "must be at least 1".into()));
    }
    if push.retry_max_seconds < push.retry_min_seconds {
        return Err((
            key(&["retry-max-seconds"]),
            "must not be less than retry-min-seconds".into(),
        ));
    }
    check_secret(
        push.ping_key_file.is_some(),
        push.ping_key_credential.as_deref(),
        ("ping key", "ferry-ping-key"),
        &["ping-key-credential"],
    )?;
    check_pings(config, push)?;
    match &push.ntfy {
        Some(ntfy) => check_ntfy(ntfy),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for good in [
            "https://hc-ping.com/0b6a2b0e-1111-2222-3333-444455556666",
            "http://127.0.0.1:8000/ping/abc",
            "http://localhost/x",
            "http://[::1]:9/x",
            "https://ntfy.sh/ferry-nas",
        ] {
            assert!(check_url(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("hc-ping.com/x", "not an http(s) URL"),
            ("http://hc-ping.com/x", "plain http"),
            ("https://hc-ping.com/x?a=1", "query"),
            ("https://u:p@hc-ping.com/x", "user name"),
            ("https://hc-ping.com/a b", "spaces"),
            ("https:///x", "needs a host"),
        ] {
            let err = check_url(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, std::path::Path::new("t")).map_err(|e| e.to_string())
    }

    #[test]
    fn mistakes_name_the_key_and_what_to_do() {
        let base = "[push.ntfy]\nurl = \"https://ntfy.sh/t\"\n";
        let ok = parse(base).expect("minimal ntfy");
        let push = ok.push.expect("push");
        assert_eq!(push.timeout_seconds, 10);
        let ntfy = push.ntfy.expect("ntfy");
        assert_eq!(ntfy.priority, NtfyPriority::High);
        assert_eq!(ntfy.tags, ["warning"]);
        for (text, key, says) in [
            ("[push.profiles]\nnas = \"https://x/y\"\n", "push.profiles.nas", "no profile"),
            ("[push.drives]\noffsite = \"https://x/y\"\n", "push.drives.offsite", "no drive"),
            ("[push]\ntimeout-seconds = 0\n", "push.timeout-seconds", "1 to 60"),
            (
                "[drives.d]\nuuid = \"1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9\"\n[push.drives]\nd = \"https://hc-ping.com/{ping-key}/d\"\n",
                "push.drives.d",
                "ping-key-credential",
            ),
            (
                "[push]\nping-key-file = \"/etc/k\"\nping-key-credential = \"k\"\n",
                "push.ping-key-credential",
                "not both",
            ),
            (
                "[push.ntfy]\nurl = \"http://ntfy.example.org/t\"\n",
                "push.ntfy.url",
                "https",
            ),
            (
                "[push.ntfy]\nurl = \"https://n/t\"\ntoken-file = \"/etc/t\"\ntoken-credential = \"t\"\n",
                "push.ntfy.token-credential",
                "not both",
            ),
            (
                "[push.ntfy]\nurl = \"https://n/t\"\ntags = [\"a,b\"]\n",
                "push.ntfy.tags",
                "not a tag",
            ),
            (
                "[push.ntfy]\nurl = \"https://n/t\"\npriority = \"loud\"\n",
                "push.ntfy.priority",
                "loud",
            ),
            ("[metrics]\ntextfile = \"/var/lib/x/ferry.txt\"\n", "metrics.textfile", ".prom"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(key) && err.contains(says), "{text:?}: {err}");
        }
    }
}
