//! What ferry-borg does with each option of borgmatic's configuration
//! schema: the single source of truth for reading borgmatic files
//! ([`crate::borgmatic`] refuses, warns about and takes options by this
//! table), for docs/borgmatic-compatibility.md (generated from it by a
//! test) and for the test that holds it to borgmatic's own schema.
//!
//! People moving from borgmatic must know before the first night's backup
//! whether their file works: an option is honoured, honoured with a stated
//! difference, ignored (it only shapes borgmatic's own output or state), or
//! refused — all refused options of a file are named together, with what to
//! use instead, when the file is read.

/// The borgmatic version whose schema this table covers.
pub const BORGMATIC_VERSION: &str = "2.1.10";

/// What ferry-borg does with one borgmatic option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Done as borgmatic does it.
    Honoured,
    /// Honoured, with this difference.
    Differs(&'static str),
    /// No effect under ferry-borg, for this reason (a warning when read).
    Ignored(&'static str),
    /// Refused when the file is read: why, and what to use instead.
    Refused(&'static str),
}

use Support::{Differs, Honoured, Ignored, Refused};

const CREATE_FLAG: &str = "a `borg create` flag ferry-borg does not pass yet; remove it (borg's default applies) or spell the profile out in ferry.toml";
const BORG_DIRECTORY: &str = "moves borg's own directories away from what ferry-borg manages; set the BORG_* variable in ferry-borg.service's environment (`systemctl edit ferry-borg`) instead";
const DATABASE: &str = "database dumps are not done by ferry-borg: dump the database from a before_backup hook into a source directory";
const MONITORING: &str = "monitoring hooks are not run by ferry-borg: ferry-notifier mails every failure ([mail] in ferry.toml)";
const SNAPSHOT: &str = "filesystem snapshots are not taken by ferry-borg: take them in a before_backup hook and back up the snapshot's mount";
const CREDENTIAL: &str = "credential hooks are not run by ferry-borg: use encryption_passcommand (a command that prints the passphrase) or a passphrase file in ferry.toml";
const OUTPUT: &str = "shapes borgmatic's own console or log output; ferry-borg logs to the journal";

/// Every top-level option of borgmatic's schema, in the schema's order.
pub const OPTIONS: &[(&str, Support)] = &[
    ("constants", Refused("ferry-borg does not substitute constants: write the values out")),
    ("source_directories", Differs("`~` is the home of the file's owner, not of the user running ferry-borg (a user-level ferry-borg reading its own user's file: that user's HOME, as borgmatic); globs are expanded as borgmatic expands them (Python's glob, directory order, a glob matching nothing kept as written)")),
    ("source_directories_must_exist", Honoured),
    ("repositories", Differs("each repository is backed up in turn, as borgmatic does, and LastResults names each one's result; ferry.toml's borgmatic-repository may pick one (by label or path); a repository entry takes path and label only (encryption, append_only, storage_quota and make_parent_directories, which only `borgmatic repo-create` reads, are ignored with a warning)")),
    ("working_directory", Refused("relative source paths are not supported: write absolute paths")),
    ("one_file_system", Honoured),
    ("numeric_ids", Refused(CREATE_FLAG)),
    ("atime", Refused(CREATE_FLAG)),
    ("ctime", Refused(CREATE_FLAG)),
    ("birthtime", Refused(CREATE_FLAG)),
    ("read_special", Refused(CREATE_FLAG)),
    ("unsafe_skip_path_validation_before_create", Refused("borgmatic's own pre-backup validation; ferry-borg has none to skip")),
    ("flags", Refused(CREATE_FLAG)),
    ("files_changed", Refused(CREATE_FLAG)),
    ("files_cache", Refused(CREATE_FLAG)),
    ("local_path", Refused("set the borg program with `program` in ferry.toml's [borg] section")),
    ("remote_path", Honoured),
    ("patterns", Honoured),
    ("patterns_from", Honoured),
    ("exclude_patterns", Honoured),
    ("exclude_from", Honoured),
    ("exclude_caches", Honoured),
    ("exclude_if_present", Honoured),
    ("keep_exclude_tags", Refused(CREATE_FLAG)),
    ("exclude_nodump", Refused(CREATE_FLAG)),
    ("borgmatic_source_directory", Ignored("borgmatic's own state; ferry keeps its state in ferry.toml's state-directory")),
    ("user_runtime_directory", Ignored("borgmatic's own runtime files; ferry-borg makes none")),
    ("user_state_directory", Ignored("borgmatic's own state; ferry keeps its state in ferry.toml's state-directory")),
    ("encryption_passcommand", Honoured),
    ("encryption_passphrase", Differs("given to borg only through a pipe (BORG_PASSPHRASE_FD), never in its environment; ${…} and {credential …} interpolation is refused")),
    ("checkpoint_interval", Refused(CREATE_FLAG)),
    ("checkpoint_volume", Refused("a borg 2 option; ferry runs borg 1.2")),
    ("chunker_params", Refused(CREATE_FLAG)),
    ("compression", Honoured),
    ("recompress", Refused("recompression is not run by ferry-borg")),
    ("upload_rate_limit", Refused("an upload limit is not passed yet: limit the link instead (tc, or the SSH server)")),
    ("upload_buffer_size", Refused("an upload buffer is not passed yet")),
    ("retries", Differs("a failed repository is tried again after the others within the same job, as borgmatic does; ferry.toml's [borg] retries then start the whole job again later")),
    ("retry_wait", Honoured),
    ("temporary_directory", Refused(BORG_DIRECTORY)),
    ("ssh_command", Differs("used as BORG_RSH, with ferry's BatchMode=yes and StrictHostKeyChecking=yes before its own options (a host key is never accepted unchecked) and known_hosts, timeouts and ssh's files under `~` after them")),
    ("borg_base_directory", Refused(BORG_DIRECTORY)),
    ("borg_config_directory", Refused(BORG_DIRECTORY)),
    ("borg_cache_directory", Refused(BORG_DIRECTORY)),
    ("use_chunks_archive", Refused(BORG_DIRECTORY)),
    ("borg_files_cache_ttl", Refused(BORG_DIRECTORY)),
    ("borg_security_directory", Refused(BORG_DIRECTORY)),
    ("borg_keys_directory", Refused(BORG_DIRECTORY)),
    ("borg_key_file", Refused(BORG_DIRECTORY)),
    ("borg_exit_codes", Refused("ferry-borg reports borg's exit codes as borg defines them: 1 is \"finished with warnings\", 2 and up fail")),
    ("umask", Honoured),
    ("lock_wait", Honoured),
    ("archive_name_format", Honoured),
    ("match_archives", Refused("prune and check select archives by the archive name format's prefix; use prefix, or archive_name_format")),
    ("archive_hostname", Refused("{hostname} is the machine's host name under ferry-borg")),
    ("archive_username", Refused("{user} is the user ferry-borg runs as")),
    ("file_list_format", Ignored(OUTPUT)),
    ("archive_list_format", Ignored(OUTPUT)),
    ("relocated_repo_access_is_ok", Refused("ferry-borg never answers borg's safety questions for you: confirm the move once by hand with `borg info`")),
    ("unknown_unencrypted_repo_access_is_ok", Refused("ferry-borg never answers borg's safety questions for you: confirm the repository once by hand with `borg info`")),
    ("debug_passphrase", Refused("would print the passphrase; ferry never does")),
    ("display_passphrase", Refused("would print the passphrase; ferry never does")),
    ("check_i_know_what_i_am_doing", Refused("ferry-borg never runs `borg check --repair`")),
    ("msgpack_version_check", Refused("a borg 2 option; ferry runs borg 1.2")),
    ("extra_borg_options", Differs("the options for create, prune, compact and check are passed; those for other borg commands never apply, as ferry-borg runs no other")),
    ("keep_within", Honoured),
    ("keep_secondly", Honoured),
    ("keep_minutely", Honoured),
    ("keep_hourly", Honoured),
    ("keep_daily", Honoured),
    ("keep_weekly", Honoured),
    ("keep_monthly", Honoured),
    ("keep_yearly", Honoured),
    ("keep_13weekly", Refused("borg 1.2 has no --keep-13weekly: use keep_weekly or keep_monthly")),
    ("keep_3monthly", Refused("borg 1.2 has no --keep-3monthly: use keep_monthly")),
    ("prefix", Honoured),
    ("compact_threshold", Refused("borg compact runs with its default threshold")),
    ("checks", Differs("the repository, archives and data checks run with their `frequency`; other checks and other check options are refused")),
    ("check_repositories", Refused("checks run on every repository the profile backs up: list only the repositories to check in the file, or pick one with borgmatic-repository")),
    ("check_last", Honoured),
    ("color", Ignored(OUTPUT)),
    ("verbosity", Ignored(OUTPUT)),
    ("syslog_verbosity", Ignored(OUTPUT)),
    ("log_file_verbosity", Ignored(OUTPUT)),
    ("log_file", Ignored(OUTPUT)),
    ("log_file_format", Ignored(OUTPUT)),
    ("monitoring_verbosity", Ignored(OUTPUT)),
    ("log_json", Ignored(OUTPUT)),
    ("progress", Ignored(OUTPUT)),
    ("statistics", Ignored(OUTPUT)),
    ("quick_statistics", Ignored(OUTPUT)),
    ("list_details", Ignored(OUTPUT)),
    ("default_actions", Refused("a profile always runs create, prune (with retention), compact and the due checks")),
    ("skip_actions", Refused("a profile always runs create, prune (with retention), compact and the due checks: leave out the retention to skip pruning")),
    ("before_actions", Honoured),
    ("before_backup", Honoured),
    ("before_prune", Honoured),
    ("before_compact", Honoured),
    ("before_check", Honoured),
    ("before_extract", Honoured),
    ("after_backup", Honoured),
    ("after_compact", Honoured),
    ("after_prune", Honoured),
    ("after_check", Honoured),
    ("after_extract", Honoured),
    ("after_actions", Honoured),
    ("on_error", Honoured),
    ("before_everything", Honoured),
    ("after_everything", Honoured),
    ("commands", Differs("`dump_data_sources` hooks are refused (ferry-borg dumps no data sources) and `{repositories}` is not put into commands; hooks also get FERRY_PROFILE, FERRY_REPOSITORY, FERRY_JOB and, on error, FERRY_ERROR; a hook exiting 75 skips the rest of its repository")),
    ("bootstrap", Refused("ferry-borg does not store borgmatic's configuration files in the archive (borgmatic does by default, for `borgmatic config bootstrap`): list the file in source_directories to keep it with the backup")),
    ("influxdb_databases", Refused(DATABASE)),
    ("postgresql_databases", Refused(DATABASE)),
    ("mariadb_databases", Refused(DATABASE)),
    ("mysql_databases", Refused(DATABASE)),
    ("sqlite_databases", Refused(DATABASE)),
    ("mongodb_databases", Refused(DATABASE)),
    ("openldap_databases", Refused(DATABASE)),
    ("ntfy", Refused(MONITORING)),
    ("pushover", Refused(MONITORING)),
    ("zabbix", Refused(MONITORING)),
    ("apprise", Refused(MONITORING)),
    ("healthchecks", Refused(MONITORING)),
    ("uptime_kuma", Refused(MONITORING)),
    ("cronitor", Refused(MONITORING)),
    ("pagerduty", Refused(MONITORING)),
    ("loki", Refused(MONITORING)),
    ("sentry", Refused(MONITORING)),
    ("watchgoose", Refused(MONITORING)),
    ("zfs", Refused(SNAPSHOT)),
    ("btrfs", Refused(SNAPSHOT)),
    ("lvm", Refused(SNAPSHOT)),
    ("systemd", Refused(CREDENTIAL)),
    ("container", Refused(CREDENTIAL)),
    ("keepassxc", Refused(CREDENTIAL)),
    ("onepassword", Refused(CREDENTIAL)),
];

/// What ferry-borg does with `option`; None for an option borgmatic's
/// schema does not have.
pub fn support(option: &str) -> Option<Support> {
    OPTIONS
        .iter()
        .find(|(name, _)| *name == option)
        .map(|(_, support)| *support)
}

/// The table as Markdown, for docs/borgmatic-compatibility.md.
pub fn markdown() -> String {
    let count = |f: fn(&Support) -> bool| OPTIONS.iter().filter(|(_, s)| f(s)).count();
    let mut out = format!(
        "# borgmatic {BORGMATIC_VERSION} options under ferry-borg\n\n\
         Generated from `services/borg/src/compat.rs` by its test (`FERRY_BLESS=1 cargo test -p ferry-borg --test compat` rewrites it);\n\
         the same table decides what ferry-borg does when it reads a borgmatic file. Every one of\n\
         the {} top-level options of borgmatic {BORGMATIC_VERSION}'s schema is listed: {} honoured, {} honoured with a\n\
         difference, {} ignored (they only shape borgmatic's own output or state), {} refused. A file\n\
         with refused options is refused when it is read, with every refused option named at once\n\
         (`ferryctl check-config` shows it before anything runs).\n\n\
         | option | under ferry-borg |\n|---|---|\n",
        OPTIONS.len(),
        count(|s| matches!(s, Honoured)),
        count(|s| matches!(s, Differs(_))),
        count(|s| matches!(s, Ignored(_))),
        count(|s| matches!(s, Refused(_))),
    );
    for (name, support) in OPTIONS {
        let text = match support {
            Honoured => "honoured".to_string(),
            Differs(how) => format!("honoured, but {how}"),
            Ignored(why) => format!("ignored: {why}"),
            Refused(why) => format!("**refused**: {why}"),
        };
        out.push_str(&format!("| `{name}` | {} |\n", text.replace('|', "\\|")));
    }
    out
}
