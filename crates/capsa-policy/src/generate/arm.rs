//! Azure Resource Manager templates: every
//! `Microsoft.ContainerInstance/containerGroups` resource becomes one
//! sandbox. Template expressions are evaluated for the subset that
//! container groups use in practice (`parameters`, `variables`, `concat`,
//! `format`, string literals); anything else is an error naming the field.
//! The policy goes back where Azure reads it:
//! `properties.confidentialComputeProperties.ccePolicy`, base64 of the Rego
//! document, whose SHA-256 the platform places in HOST_DATA.

use serde_json::{Map, Value};

use super::settings::Settings;
use super::spec::{ContainerSpec, EnvSpec, Platform, VolumeSource, Workload};
use super::{
    FieldCheck, GenerateError, Generated, GeneratedWorkload, ImageResolver, Options, base64, required_str, string_list,
    volume_mount,
};

const GROUP_TYPE: &str = "Microsoft.ContainerInstance/containerGroups";
const GROUP_PROPERTY_KEYS: &[&str] = &[
    "containers",
    "initContainers",
    "volumes",
    "osType",
    "restartPolicy",
    "ipAddress",
    "sku",
    "confidentialComputeProperties",
    "imageRegistryCredentials",
    "subnetIds",
    "diagnostics",
    "dnsConfig",
    "priority",
];
const CONTAINER_PROPERTY_KEYS: &[&str] = &[
    "image",
    "command",
    "environmentVariables",
    "volumeMounts",
    "securityContext",
    "resources",
    "ports",
    "livenessProbe",
    "readinessProbe",
];
const SECURITY_KEYS: &[&str] =
    &["privileged", "allowPrivilegeEscalation", "runAsUser", "runAsGroup", "capabilities", "seccompProfile"];

/// Generates policies for every container group in an ARM template.
pub fn generate(
    origin: &str,
    text: &str,
    resolver: &mut dyn ImageResolver,
    settings: &Settings,
    options: &Options,
) -> Result<Generated, GenerateError> {
    let mut template: Value = serde_json::from_str(text)
        .map_err(|e| GenerateError::Parse { origin: origin.to_owned(), reason: e.to_string() })?;
    // Expressions read the template as written while the copy is annotated.
    let original = template.clone();
    let scope = Scope::new(&original);
    let mut workloads = Vec::new();
    let resources = template
        .get_mut("resources")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| GenerateError::NoWorkload(origin.to_owned()))?;
    for (i, resource) in resources.iter_mut().enumerate() {
        if resource.get("type").and_then(Value::as_str) != Some(GROUP_TYPE) {
            continue;
        }
        let path = format!("resources[{i}]");
        let name = resource.get("name").and_then(Value::as_str).map_or_else(|| path.clone(), |n| scope.eval_or_raw(n));
        let properties = resource.get("properties").cloned().unwrap_or(Value::Null);
        let workload = group(&format!("{path}.properties"), &name, &properties, &scope, options)?;
        let data = super::build::build(&workload, resolver, settings)?;
        let generated = GeneratedWorkload::new(name, data, &workload, &options.sandbox_settings)?;
        let props = resource
            .get_mut("properties")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| GenerateError::Invalid { path: format!("{path}.properties"), reason: "missing".into() })?;
        let ccp = props.entry("confidentialComputeProperties").or_insert_with(|| Value::Object(Map::new()));
        if let Some(ccp) = ccp.as_object_mut() {
            ccp.insert("ccePolicy".into(), Value::String(base64(generated.document.rego().as_bytes())));
        }
        props.insert("sku".into(), Value::String("Confidential".into()));
        workloads.push(generated);
    }
    if workloads.is_empty() {
        return Err(GenerateError::NoWorkload(origin.to_owned()));
    }
    let annotated = serde_json::to_string_pretty(&template)
        .map_err(|e| GenerateError::Parse { origin: origin.to_owned(), reason: e.to_string() })?;
    Ok(Generated { workloads, annotated })
}

fn group(
    path: &str,
    name: &str,
    props: &Value,
    scope: &Scope<'_>,
    options: &Options,
) -> Result<Workload, GenerateError> {
    let mut check = FieldCheck::new();
    check.keys(props, path, GROUP_PROPERTY_KEYS);
    let mut volumes = std::collections::HashMap::new();
    if let Some(list) = props.get("volumes").and_then(Value::as_array) {
        for (i, v) in list.iter().enumerate() {
            let vname = v.get("name").and_then(Value::as_str).map(|n| scope.eval_or_raw(n)).unwrap_or_default();
            if ["emptyDir", "secret", "azureFile", "gitRepo"].iter().any(|k| v.get(k).is_some()) {
                volumes.insert(vname.clone(), VolumeSource::Sandbox(vname));
            } else {
                check.unsupported(format!("{path}.volumes[{i}] (volume type)"));
            }
        }
    }
    let mut containers = Vec::new();
    for key in ["initContainers", "containers"] {
        let Some(list) = props.get(key).and_then(Value::as_array) else { continue };
        for (i, c) in list.iter().enumerate() {
            let cpath = format!("{path}.{key}[{i}]");
            containers.push(container(&cpath, c, &volumes, scope, &mut check)?);
        }
    }
    check.finish(options)?;
    Ok(Workload {
        platform: Platform::AzureContainerInstances,
        name: name.to_owned(),
        containers,
        workload_api: None,
        encfs: Vec::new(),
    })
}

fn container(
    path: &str,
    c: &Value,
    volumes: &std::collections::HashMap<String, VolumeSource>,
    scope: &Scope<'_>,
    check: &mut FieldCheck,
) -> Result<ContainerSpec, GenerateError> {
    let field = |v: &Value, at: &str| -> Result<Value, GenerateError> { scope.eval_value(v, at) };
    let name = c.get("name").map(|v| field(v, &format!("{path}.name"))).transpose()?;
    let name = name
        .as_ref()
        .and_then(Value::as_str)
        .ok_or_else(|| GenerateError::Invalid { path: format!("{path}.name"), reason: "missing".into() })?;
    let props = c.get("properties").cloned().unwrap_or(Value::Null);
    let ppath = format!("{path}.properties");
    check.keys(&props, &ppath, CONTAINER_PROPERTY_KEYS);
    let props = field(&props, &ppath)?;
    let image = required_str(&props, "image", &ppath)?;
    let mut env = Vec::new();
    if let Some(list) = props.get("environmentVariables").and_then(Value::as_array) {
        for (i, e) in list.iter().enumerate() {
            let n = e.get("name").and_then(Value::as_str).ok_or_else(|| GenerateError::Invalid {
                path: format!("{ppath}.environmentVariables[{i}].name"),
                reason: "missing".into(),
            })?;
            if let Some(v) = e.get("value").and_then(Value::as_str) {
                env.push(EnvSpec::Literal { name: n.into(), value: v.into() });
            } else if e.get("secureValue").is_some() {
                // Secure values stay out of the policy, which is public.
                env.push(EnvSpec::RuntimeValue { name: n.into(), value_pattern: ".*".into() });
            }
        }
    }
    let mut mounts = Vec::new();
    if let Some(list) = props.get("volumeMounts").and_then(Value::as_array) {
        for (i, m) in list.iter().enumerate() {
            let mpath = format!("{ppath}.volumeMounts[{i}]");
            mounts.push(volume_mount(&mpath, m, volumes, "container group")?);
        }
    }
    let security = props.get("securityContext").cloned().unwrap_or(Value::Null);
    check.keys(&security, &format!("{ppath}.securityContext"), SECURITY_KEYS);
    let uint = |key: &str| security.get(key).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok());
    let caps = |key: &str| {
        string_list(
            security.pointer(&format!("/capabilities/{key}")),
            &format!("{ppath}.securityContext.capabilities.{key}"),
        )
    };
    let mut exec = Vec::new();
    for probe in ["livenessProbe", "readinessProbe"] {
        if let Some(cmd) =
            string_list(props.pointer(&format!("/{probe}/exec/command")), &format!("{ppath}.{probe}.exec.command"))?
        {
            exec.push(cmd);
        }
    }
    Ok(ContainerSpec {
        name: name.to_owned(),
        image: image.to_owned(),
        // ACI's `command` replaces the image's entrypoint and cmd together.
        command: string_list(props.get("command"), &format!("{ppath}.command"))?,
        args: None,
        env,
        run_as_user: uint("runAsUser"),
        run_as_group: uint("runAsGroup"),
        privileged: security.get("privileged").and_then(Value::as_bool).unwrap_or(false),
        allow_privilege_escalation: security.get("allowPrivilegeEscalation").and_then(Value::as_bool),
        cap_add: caps("add")?.unwrap_or_default(),
        cap_drop: caps("drop")?.unwrap_or_default(),
        mounts,
        exec,
        ..ContainerSpec::default()
    })
}

/// The template's parameters and variables, for expression evaluation.
struct Scope<'a> {
    parameters: Option<&'a Map<String, Value>>,
    variables: Option<&'a Map<String, Value>>,
}

impl<'a> Scope<'a> {
    fn new(template: &'a Value) -> Self {
        Self {
            parameters: template.get("parameters").and_then(Value::as_object),
            variables: template.get("variables").and_then(Value::as_object),
        }
    }

    /// Evaluates every expression string inside a JSON value.
    fn eval_value(&self, v: &Value, path: &str) -> Result<Value, GenerateError> {
        Ok(match v {
            Value::String(s) => self.eval_string(s, path)?,
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| self.eval_value(x, &format!("{path}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, x)| Ok((k.clone(), self.eval_value(x, &format!("{path}.{k}"))?)))
                    .collect::<Result<_, GenerateError>>()?,
            ),
            other => other.clone(),
        })
    }

    fn eval_or_raw(&self, s: &str) -> String {
        match self.eval_string(s, "") {
            Ok(Value::String(v)) => v,
            _ => s.to_owned(),
        }
    }

    /// `[expr]` is an expression, `[[...` an escaped literal `[...`.
    fn eval_string(&self, s: &str, path: &str) -> Result<Value, GenerateError> {
        if let Some(rest) = s.strip_prefix("[[") {
            return Ok(Value::String(format!("[{rest}")));
        }
        match s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            Some(expr) => {
                let mut parser = ExprParser { src: expr.as_bytes(), pos: 0, scope: self, path };
                let value = parser.expr()?;
                parser.skip_ws();
                if parser.pos != parser.src.len() {
                    return Err(parser.error("unexpected text after the expression"));
                }
                Ok(value)
            }
            None => Ok(Value::String(s.to_owned())),
        }
    }

    fn parameter(&self, name: &str, path: &str) -> Result<Value, GenerateError> {
        self.parameters
            .and_then(|p| p.get(name))
            .and_then(|p| p.get("defaultValue"))
            .map(|v| self.eval_value(v, path))
            .transpose()?
            .ok_or_else(|| GenerateError::Invalid {
                path: path.to_owned(),
                reason: format!("parameter '{name}' has no defaultValue: give it one in the template"),
            })
    }

    fn variable(&self, name: &str, path: &str) -> Result<Value, GenerateError> {
        let v = self.variables.and_then(|v| v.get(name)).ok_or_else(|| GenerateError::Invalid {
            path: path.to_owned(),
            reason: format!("variable '{name}' is not defined"),
        })?;
        self.eval_value(v, path)
    }
}

/// A recursive-descent parser for the ARM expression subset.
struct ExprParser<'s, 'a> {
    src: &'s [u8],
    pos: usize,
    scope: &'a Scope<'a>,
    path: &'a str,
}

impl ExprParser<'_, '_> {
    fn error(&self, reason: &str) -> GenerateError {
        GenerateError::Invalid {
            path: self.path.to_owned(),
            reason: format!(
                "template expression: {reason} (capsa evaluates parameters, variables, concat, format and string literals)"
            ),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), GenerateError> {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected '{}'", c as char)))
        }
    }

    fn expr(&mut self) -> Result<Value, GenerateError> {
        self.skip_ws();
        match self.peek() {
            Some(b'\'') => self.string(),
            Some(c) if c.is_ascii_digit() => {
                let start = self.pos;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.pos += 1;
                }
                let text = String::from_utf8_lossy(self.src.get(start..self.pos).unwrap_or_default()).into_owned();
                text.parse::<i64>().map(Value::from).map_err(|_| self.error("bad number"))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.pos;
                while self.peek().is_some_and(|c| c.is_ascii_alphanumeric()) {
                    self.pos += 1;
                }
                let name =
                    String::from_utf8_lossy(self.src.get(start..self.pos).unwrap_or_default()).to_ascii_lowercase();
                self.expect(b'(')?;
                let mut args = Vec::new();
                self.skip_ws();
                if self.peek() == Some(b')') {
                    self.pos += 1;
                } else {
                    loop {
                        args.push(self.expr()?);
                        self.skip_ws();
                        match self.peek() {
                            Some(b',') => self.pos += 1,
                            Some(b')') => {
                                self.pos += 1;
                                break;
                            }
                            _ => return Err(self.error("expected ',' or ')'")),
                        }
                    }
                }
                self.call(&name, args)
            }
            _ => Err(self.error("expected a function call or a 'string'")),
        }
    }

    fn string(&mut self) -> Result<Value, GenerateError> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated string")),
                Some(b'\'') if self.src.get(self.pos + 1) == Some(&b'\'') => {
                    out.push(b'\'');
                    self.pos += 2;
                }
                Some(b'\'') => {
                    self.pos += 1;
                    return Ok(Value::String(String::from_utf8_lossy(&out).into_owned()));
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn call(&self, name: &str, args: Vec<Value>) -> Result<Value, GenerateError> {
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match (name, args.as_slice()) {
            ("parameters", [Value::String(p)]) => self.scope.parameter(p, self.path),
            ("variables", [Value::String(v)]) => self.scope.variable(v, self.path),
            ("concat", parts) if parts.iter().all(Value::is_array) => {
                Ok(Value::Array(parts.iter().filter_map(Value::as_array).flatten().cloned().collect()))
            }
            ("concat", parts) => Ok(Value::String(parts.iter().map(text).collect())),
            ("format", [Value::String(fmt), rest @ ..]) => {
                let mut out = fmt.clone();
                for (i, v) in rest.iter().enumerate() {
                    out = out.replace(&format!("{{{i}}}"), &text(v));
                }
                Ok(Value::String(out))
            }
            ("tolower", [Value::String(s)]) => Ok(Value::String(s.to_lowercase())),
            ("toupper", [Value::String(s)]) => Ok(Value::String(s.to_uppercase())),
            ("string", [v]) => Ok(Value::String(text(v))),
            _ => Err(self.error(&format!("function {name}() with {} argument(s) is not supported", args.len()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_evaluate() {
        let template = serde_json::json!({
            "parameters": {"tag": {"type": "string", "defaultValue": "1.0"}, "nodef": {"type": "string"}},
            "variables": {"repo": "[concat('example.com/', 'app')]"}
        });
        // Expressions read the template as written while the copy is annotated.
        let original = template.clone();
        let scope = Scope::new(&original);
        let eval = |s: &str| scope.eval_string(s, "x");
        assert_eq!(eval("[concat(variables('repo'), ':', parameters('tag'))]").unwrap(), "example.com/app:1.0");
        assert_eq!(eval("[format('{0}-{1}', 'a', 2)]").unwrap(), "a-2");
        assert_eq!(eval("[[literal]").unwrap(), "[literal]");
        assert_eq!(eval("plain").unwrap(), "plain");
        assert_eq!(eval("['it''s']").unwrap(), "it's");
        assert!(eval("[parameters('nodef')]").unwrap_err().to_string().contains("defaultValue"));
        assert!(eval("[uniqueString('x')]").unwrap_err().to_string().contains("not supported"));
        assert!(eval("[concat('a']").is_err());
    }
}
