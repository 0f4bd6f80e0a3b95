//! Rendering of the per-host files (agent config, etcd config, HAProxy config, systemd units)
//! from minijinja templates.
//!
//! The environment is strict on purpose: undefined variables are errors (a typo in a template
//! must fail the plan, not ship an empty value), debug info is on so errors name the variable,
//! trailing newlines are kept and `trim_blocks` makes block tags not leave blank lines. Templates
//! come from a user directory when one is given, falling back to the built-in set compiled into
//! the binary (so an installed `pgherd` needs no template files). Auto-reload is off: a render
//! pass must see one consistent set of templates.
//!
//! Templates get a plain data context (see [`context`]) built from the validated inventory and
//! one host. Strings are emitted through the `json` filter, which quotes them as JSON: valid
//! YAML scalars whatever characters a value holds. Rendered files that may contain passwords
//! are flagged `sensitive`; their `Debug` never shows content.

use std::path::{Path, PathBuf};

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, UndefinedBehavior, Value};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::inventory::profile::format_haproxy_duration;
use crate::inventory::{Etcd, Host, Inventory, Role, model};

/// Where the agent binary and its config live on a host.
pub const AGENT_BINARY_PATH: &str = "/usr/local/bin/pgherd-agent";
pub const AGENT_CONFIG_PATH: &str = "/etc/pgherd/agent.yml";

/// What [`Renderer::render_etcd_join`] puts where a joining member's `initial-cluster` goes:
/// the `etcd_members` step replaces it with the member list etcd returns at `member add`.
pub const ETCD_INITIAL_CLUSTER_PLACEHOLDER: &str = "@@pgherd-initial-cluster@@";
pub const ETCD_CONFIG_PATH: &str = "/etc/pgherd/etcd.yml";

/// A built-in template and where its output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateSpec {
    pub name: &'static str,
    /// Remote destination.
    pub dest: &'static str,
    pub mode: u32,
    pub owner: &'static str,
    pub group: &'static str,
    /// Rendered for hosts with this role.
    pub role: Role,
    /// Output contains passwords.
    pub sensitive: bool,
    /// Only with etcd run by pgherd (not for external etcd).
    pub embedded_etcd_only: bool,
}

/// The files pgherd renders, in the order they are produced for a host.
pub const TEMPLATES: &[TemplateSpec] = &[
    TemplateSpec {
        name: "etcd.conf.j2",
        dest: ETCD_CONFIG_PATH,
        mode: 0o644,
        owner: "root",
        group: "root",
        role: Role::Etcd,
        sensitive: false,
        embedded_etcd_only: true,
    },
    TemplateSpec {
        name: "etcd.service.j2",
        dest: "/etc/systemd/system/etcd.service",
        mode: 0o644,
        owner: "root",
        group: "root",
        role: Role::Etcd,
        sensitive: false,
        embedded_etcd_only: true,
    },
    TemplateSpec {
        name: "agent.yml.j2",
        dest: AGENT_CONFIG_PATH,
        mode: 0o600,
        owner: "postgres",
        group: "postgres",
        role: Role::Postgres,
        sensitive: true,
        embedded_etcd_only: false,
    },
    TemplateSpec {
        name: "pgherd-agent.service.j2",
        dest: "/etc/systemd/system/pgherd-agent.service",
        mode: 0o644,
        owner: "root",
        group: "root",
        role: Role::Postgres,
        sensitive: false,
        embedded_etcd_only: false,
    },
    TemplateSpec {
        name: "haproxy.cfg.j2",
        dest: "/etc/haproxy/haproxy.cfg",
        mode: 0o644,
        owner: "root",
        group: "root",
        role: Role::Haproxy,
        sensitive: false,
        embedded_etcd_only: false,
    },
];

/// Built-in template sources (including partials such as `pg_hba.j2`).
const BUILTIN: &[(&str, &str)] = &[
    ("agent.yml.j2", include_str!("../templates/agent.yml.j2")),
    ("pg_hba.j2", include_str!("../templates/pg_hba.j2")),
    ("etcd.conf.j2", include_str!("../templates/etcd.conf.j2")),
    (
        "etcd.service.j2",
        include_str!("../templates/etcd.service.j2"),
    ),
    (
        "haproxy.cfg.j2",
        include_str!("../templates/haproxy.cfg.j2"),
    ),
    (
        "pgherd-agent.service.j2",
        include_str!("../templates/pgherd-agent.service.j2"),
    ),
];

pub fn template_spec(name: &str) -> Option<&'static TemplateSpec> {
    TEMPLATES.iter().find(|t| t.name == name)
}

pub fn builtin_source(name: &str) -> Option<&'static str> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// One rendered file, ready to upload.
#[derive(Clone, PartialEq, Eq)]
pub struct RenderedFile {
    /// Remote destination.
    pub path: PathBuf,
    pub content: String,
    pub mode: u32,
    pub owner: String,
    pub group: String,
    /// Template it came from.
    pub template: String,
    /// Contains passwords: never print `content` (use [`Inventory::redact`] for diffs).
    pub sensitive: bool,
}

impl RenderedFile {
    /// sha256 of the content, hex (what the planner compares with the remote file's hash).
    pub fn sha256(&self) -> String {
        let d = Sha256::digest(self.content.as_bytes());
        d.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for RenderedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("RenderedFile");
        d.field("path", &self.path)
            .field("mode", &format_args!("{:04o}", self.mode))
            .field("owner", &self.owner)
            .field("group", &self.group)
            .field("template", &self.template)
            .field("sensitive", &self.sensitive);
        if self.sensitive {
            d.field(
                "content",
                &format_args!("<{} bytes, sha256 {}>", self.content.len(), self.sha256()),
            );
        } else {
            d.field("content", &self.content);
        }
        d.finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("host {0:?} is not in the inventory")]
    UnknownHost(String),
    #[error("{0}: cannot use template directory: not a directory")]
    BadTemplateDir(String),
    /// A template failed (syntax, undefined variable, filter error). `location` is
    /// `<file>:<line>`, the file being the user's copy when it came from the user directory.
    #[error("{location}: {message}{}", source_line.as_ref().map(|l| format!("\n    {l}")).unwrap_or_default())]
    Template {
        location: String,
        message: String,
        source_line: Option<String>,
    },
    /// The template rendered but its output is not a valid file of its kind (e.g. the agent
    /// config does not parse). Secrets are redacted from `message`.
    #[error("{template} rendered for host {host} is invalid: {message}")]
    InvalidOutput {
        template: String,
        host: String,
        message: String,
    },
}

/// A configured minijinja environment over the built-in templates and an optional user
/// directory that overrides them file by file.
pub struct Renderer {
    env: Environment<'static>,
    user_dir: Option<PathBuf>,
}

impl Renderer {
    /// The built-in templates only.
    pub fn builtin() -> Renderer {
        Renderer::build(None)
    }

    /// Templates from `dir` first, built-ins for the files `dir` does not have.
    pub fn with_dir(dir: &Path) -> Result<Renderer, RenderError> {
        if !dir.is_dir() {
            return Err(RenderError::BadTemplateDir(dir.display().to_string()));
        }
        Ok(Renderer::build(Some(dir.to_path_buf())))
    }

    fn build(user_dir: Option<PathBuf>) -> Renderer {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Debug info makes errors name the undefined variable; we never print the alternate
        // (`{:#}`) form, which would dump variable values (passwords) too.
        env.set_debug(true);
        env.set_auto_reload(false);
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .keep_trailing_newline(true)
                .build()
                .expect("static syntax config is valid"),
        );
        let dir = user_dir.clone();
        env.set_loader(move |name| {
            if let Some(dir) = &dir
                && let Some(src) = minijinja::path_loader(dir)(name)?
            {
                return Ok(Some(src));
            }
            Ok(builtin_source(name).map(|s| minijinja::TemplateSource::from(s.to_string())))
        });
        env.add_filter("json", json_filter);
        Renderer { env, user_dir }
    }

    /// Renders one template for `host`.
    pub fn render(
        &self,
        template: &str,
        inv: &Inventory,
        host: &str,
    ) -> Result<String, RenderError> {
        self.render_with(template, inv, host, |_| {})
    }

    /// [`Self::render`] with the context adjusted by `edit` first.
    fn render_with(
        &self,
        template: &str,
        inv: &Inventory,
        host: &str,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> Result<String, RenderError> {
        let h = inv
            .host(host)
            .ok_or_else(|| RenderError::UnknownHost(host.to_string()))?;
        let mut ctx = context(inv, h);
        edit(&mut ctx);
        let t = self
            .env
            .get_template(template)
            .map_err(|e| self.template_error(&e))?;
        t.render(minijinja::value::Serde(&ctx))
            .map_err(|e| self.template_error(&e))
    }

    /// [`Self::render`], then checks the output of built-in templates (the agent config must
    /// parse, the etcd config must be a YAML mapping).
    pub fn render_checked(
        &self,
        template: &str,
        inv: &Inventory,
        host: &str,
    ) -> Result<String, RenderError> {
        let content = self.render(template, inv, host)?;
        check_output(template, &content, inv, host)?;
        Ok(content)
    }

    /// [`Self::render_checked`] of an etcd config for a member joining a running cluster:
    /// `etcd.initial_cluster_state` is `existing` and `etcd.initial_cluster` is
    /// [`ETCD_INITIAL_CLUSTER_PLACEHOLDER`], replaced by the member list etcd returns at
    /// `member add` time.
    pub fn render_etcd_join(
        &self,
        template: &str,
        inv: &Inventory,
        host: &str,
    ) -> Result<String, RenderError> {
        let content = self.render_with(template, inv, host, |ctx| {
            ctx["etcd"]["initial_cluster"] = json!(ETCD_INITIAL_CLUSTER_PLACEHOLDER);
            ctx["etcd"]["initial_cluster_state"] = json!("existing");
        })?;
        check_output(template, &content, inv, host)?;
        Ok(content)
    }

    /// Expands `{{ ... }}` expressions in a short string (playbook arguments) with the same
    /// context as the templates. Strings without `{{` are returned as they are.
    pub fn render_str(
        &self,
        text: &str,
        inv: &Inventory,
        host: &str,
    ) -> Result<String, RenderError> {
        if !text.contains("{{") && !text.contains("{%") {
            return Ok(text.to_string());
        }
        let h = inv
            .host(host)
            .ok_or_else(|| RenderError::UnknownHost(host.to_string()))?;
        let ctx = context(inv, h);
        self.env
            .render_str(text, minijinja::value::Serde(&ctx))
            .map_err(|e| RenderError::Template {
                location: format!("expression {text:?}"),
                message: match e.detail() {
                    Some(d) => format!("{}: {d}", e.kind()),
                    None => e.kind().to_string(),
                },
                source_line: None,
            })
    }

    /// Every file `host` needs, by its roles, checked (the agent config must parse with
    /// [`crate::config::AgentConfig::parse`], the etcd config must be YAML).
    pub fn render_all(
        &self,
        inv: &Inventory,
        host: &str,
    ) -> Result<Vec<RenderedFile>, RenderError> {
        let h = inv
            .host(host)
            .ok_or_else(|| RenderError::UnknownHost(host.to_string()))?;
        let embedded = matches!(inv.etcd, Etcd::Embedded(_));
        let mut out = Vec::new();
        for spec in TEMPLATES {
            if !h.has(spec.role) || (spec.embedded_etcd_only && !embedded) {
                continue;
            }
            let content = self.render(spec.name, inv, host)?;
            check_output(spec.name, &content, inv, host)?;
            out.push(RenderedFile {
                path: PathBuf::from(spec.dest),
                content,
                mode: spec.mode,
                owner: spec.owner.to_string(),
                group: spec.group.to_string(),
                template: spec.name.to_string(),
                sensitive: spec.sensitive,
            });
        }
        Ok(out)
    }

    fn template_error(&self, e: &minijinja::Error) -> RenderError {
        let name = e.name().unwrap_or("<template>").to_string();
        let file = match &self.user_dir {
            Some(d) if d.join(&name).is_file() => d.join(&name).display().to_string(),
            _ => format!("templates/{name}"),
        };
        let location = match e.line() {
            Some(l) => format!("{file}:{l}"),
            None => file,
        };
        let message = match e.detail() {
            Some(d) => format!("{}: {d}", e.kind()),
            None => e.kind().to_string(),
        };
        // The template's own line (template text, never a rendered value).
        let source_line = match (e.template_source(), e.line()) {
            (Some(src), Some(l)) => src
                .lines()
                .nth(l.saturating_sub(1))
                .map(|s| s.trim().to_string()),
            _ => None,
        };
        RenderError::Template {
            location,
            message,
            source_line,
        }
    }
}

/// Renders every file `host` needs with the built-in templates.
pub fn render_all(inv: &Inventory, host: &str) -> Result<Vec<RenderedFile>, RenderError> {
    Renderer::builtin().render_all(inv, host)
}

fn json_filter(v: Value) -> Result<String, minijinja::Error> {
    serde_json::to_string(&v).map_err(|e| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("cannot encode as JSON: {e}"),
        )
    })
}

fn check_output(
    template: &str,
    content: &str,
    inv: &Inventory,
    host: &str,
) -> Result<(), RenderError> {
    let invalid = |message: String| RenderError::InvalidOutput {
        template: template.to_string(),
        host: host.to_string(),
        message: inv.redact(&message),
    };
    match template {
        "agent.yml.j2" => {
            crate::config::AgentConfig::parse(content, crate::render::AGENT_CONFIG_PATH)
                .map_err(|e| invalid(e.to_string()))?;
        }
        "etcd.conf.j2" => {
            let v: serde_json::Value =
                crate::yaml::from_str(content).map_err(|e| invalid(e.to_string()))?;
            if !v.is_object() {
                return Err(invalid("not a YAML mapping".into()));
            }
        }
        _ => {}
    }
    Ok(())
}

fn listen_any(h: &Host) -> &'static str {
    if h.address.parse::<std::net::Ipv6Addr>().is_ok() {
        "::"
    } else {
        "0.0.0.0"
    }
}

fn host_summary(inv: &Inventory, h: &Host) -> serde_json::Value {
    json!({
        "name": h.name.as_str(),
        "address": h.address,
        "roles": h.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        "hba_address": h.hba_address(),
        "pg_endpoint": h.endpoint(inv.postgresql.port),
        "restapi_endpoint": h.endpoint(inv.agent.restapi_port),
    })
}

/// The data templates see for `host`. Field names are the template API: keep them stable.
pub fn context(inv: &Inventory, h: &Host) -> serde_json::Value {
    let check = &inv.haproxy.check;
    let (client_port, peer_port, data_dir, token) = match &inv.etcd {
        Etcd::Embedded(e) => (
            e.client_port,
            e.peer_port,
            e.data_dir.display().to_string(),
            e.token.clone(),
        ),
        Etcd::External { .. } => (0, 0, String::new(), String::new()),
    };
    let mut host = host_summary(inv, h);
    let extra = json!({
        "listen_any": listen_any(h),
        "endpoint_client": h.endpoint(client_port),
        "endpoint_peer": h.endpoint(peer_port),
        "is_first_postgres": h.has(Role::Postgres) && inv.first_postgres().name == h.name,
        "tags": h.tags,
        "parameters": h.parameters,
        "watchdog": {
            "mode": match h.watchdog.mode {
                crate::config::WatchdogMode::Off => "off",
                crate::config::WatchdogMode::Automatic => "automatic",
                crate::config::WatchdogMode::Required => "required",
            },
            "device": h.watchdog.device.display().to_string(),
            "safety_margin": h.watchdog.safety_margin,
        },
    });
    if let (Some(m), serde_json::Value::Object(e)) = (host.as_object_mut(), extra) {
        m.extend(e);
    }
    let cb = &inv.callbacks;
    let mut agent_callbacks = serde_json::Map::new();
    for (k, v) in [
        ("on_start", &cb.on_start),
        ("on_stop", &cb.on_stop),
        ("on_restart", &cb.on_restart),
        ("on_reload", &cb.on_reload),
        ("on_role_change", &cb.on_role_change),
    ] {
        if let Some(v) = v {
            agent_callbacks.insert(k.to_string(), json!(v));
        }
    }
    json!({
        "cluster": inv.cluster,
        "namespace": inv.namespace,
        "profile": inv.profile.as_str(),
        "synchronous_mode": inv.synchronous_mode,
        "timing": {
            "ttl": inv.timing.ttl,
            "loop_wait": inv.timing.loop_wait,
            "retry_timeout": inv.timing.retry_timeout,
            "primary_start_timeout": inv.timing.primary_start_timeout,
            "maximum_lag_on_failover": inv.maximum_lag_on_failover,
        },
        "host": host,
        "hosts": inv.hosts.iter().map(|x| host_summary(inv, x)).collect::<Vec<_>>(),
        "postgres_hosts": inv.hosts_with(Role::Postgres).map(|x| host_summary(inv, x)).collect::<Vec<_>>(),
        "postgresql": {
            "version": inv.postgresql.version,
            "bin_dir": inv.postgresql.bin_dir.display().to_string(),
            "data_dir": inv.postgresql.data_dir.display().to_string(),
            "port": inv.postgresql.port,
            "parameters": inv.postgresql.parameters,
            "pg_hba": inv.postgresql.pg_hba,
            "use_pg_rewind": inv.postgresql.use_pg_rewind,
            "use_slots": inv.postgresql.use_slots,
            "superuser": model::SUPERUSER_NAME,
            "replication_user": model::REPLICATION_USER_NAME,
            "rewind_user": model::REWIND_USER_NAME,
            "users": inv.postgresql.users.iter().map(|u| json!({"name": u.name, "options": u.options})).collect::<Vec<_>>(),
            "databases": inv.postgresql.databases.iter().map(|d| json!({"name": d.name, "owner": d.owner})).collect::<Vec<_>>(),
        },
        "etcd": {
            "embedded": matches!(inv.etcd, Etcd::Embedded(_)),
            "endpoints": inv.etcd_endpoints(),
            "client_port": client_port,
            "peer_port": peer_port,
            "data_dir": data_dir,
            "token": token,
            "initial_cluster": inv.etcd_initial_cluster().unwrap_or_default(),
            // `new` is what a fresh cluster's members start with; a member joining a running
            // cluster gets `existing` from [`Renderer::render_etcd_join`], and an initialised
            // member never has its etcd.conf rewritten for initial-* alone (etcd ignores them).
            "initial_cluster_state": "new",
            "config_path": ETCD_CONFIG_PATH,
        },
        "haproxy": {
            "primary_port": inv.haproxy.primary_port,
            "replica_port": inv.haproxy.replica_port,
            "stats_port": inv.haproxy.stats_port,
            "maxconn": inv.haproxy.maxconn,
            "check": haproxy_check_context(check),
            "primary_check": haproxy_check_context(&inv.haproxy.primary_check),
        },
        "agent": {
            "restapi_port": inv.agent.restapi_port,
            "restapi_username": inv.agent.restapi_username,
            "restapi_allowlist": restapi_allowlist(inv),
            "log_level": inv.agent.log_level,
            "binary_path": AGENT_BINARY_PATH,
            "config_path": AGENT_CONFIG_PATH,
        },
        "callbacks": {
            "on_start": cb.on_start, "on_stop": cb.on_stop, "on_restart": cb.on_restart,
            "on_reload": cb.on_reload, "on_role_change": cb.on_role_change,
            "pre_promote": cb.pre_promote, "before_stop": cb.before_stop,
        },
        "agent_callbacks": agent_callbacks,
        "secrets": {
            "superuser": inv.secrets.superuser.expose(),
            "replication": inv.secrets.replication.expose(),
            "rewind": inv.secrets.rewind.expose(),
            "restapi": inv.secrets.restapi.expose(),
        },
    })
}

/// The agents' `restapi.allowlist`: empty without `agent.restapi_allowlist`; with it, those
/// entries plus every host of the inventory (see [`crate::inventory::Agent::restapi_allowlist`]).
fn restapi_allowlist(inv: &Inventory) -> Vec<String> {
    if inv.agent.restapi_allowlist.is_empty() {
        return Vec::new();
    }
    let mut out = inv.agent.restapi_allowlist.clone();
    // A host given by name is left to `allowlist_include_members` (names are not resolved).
    for h in &inv.hosts {
        if crate::config::access::Cidr::parse(&h.address).is_some() && !out.contains(&h.address) {
            out.push(h.address.clone());
        }
    }
    out
}

/// One pool's check cadence as haproxy.cfg writes it.
fn haproxy_check_context(check: &crate::inventory::HaproxyCheck) -> serde_json::Value {
    serde_json::json!({
        "inter": format_haproxy_duration(check.inter_ms),
        "fastinter": format_haproxy_duration(check.fastinter_ms),
        "downinter": format_haproxy_duration(check.downinter_ms),
        "rise": check.rise,
        "fall": check.fall,
        "timeout": format_haproxy_duration(check.timeout_ms),
        "connect": format_haproxy_duration(check.connect_ms),
    })
}
