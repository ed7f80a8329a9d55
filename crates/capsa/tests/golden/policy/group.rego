# capsa execution-policy rules, for policy data schema version 1.
#
# A policy document is this file followed by `policy_data := <JSON>`, the
# per-workload data (crates/capsa-policy/src/model.rs). The hardware
# measures the whole document, so these rules are part of what a relying
# party verifies: they must read as what they enforce.
#
# `input` is one host request (crates/capsa-policy/src/request.rs): a JSON
# object whose `op` names the operation. The engine evaluates `decision`
# and nothing else. (`workload_api` is the one op the agent asks on behalf
# of the pod's containers rather than the host: a call to the workload API
# it serves inside the sandbox.)
#
# How the rules are built, and why:
#
# - Positive checks decide. Every check is an `*_ok` rule that holds only
#   when the request is shown to be acceptable, and a request is allowed
#   only when all the checks of its op hold. A check that cannot be
#   evaluated (a field of the wrong type, a missing field, a builtin error)
#   is undefined, and so denies: the rules fail closed.
# - Reasons explain, and are computed only for a denied request. For every
#   failed check a reason says which rule, which field, what the policy
#   allows and what was requested. A reason that failed to evaluate would
#   vanish, which is why reasons never decide (the engine reports a denial
#   without reasons as such).
# - Environment values are never shown: they may be secrets. Every reason
#   that mentions an environment entry goes through `env_shown` or
#   `pattern_shown`, which keep the name and replace the value (the engine
#   scrubs again after evaluation).
# - Regular expressions from the policy must match a WHOLE string: the
#   engine anchors them as \A(?:P)\z. \A and \z are the start and end of
#   the text whatever the flags, so a value with a newline cannot end a
#   match early the way `$` can in multi-line mode. The engine refuses a document
#   whose patterns are not valid regular expressions on their own, so no
#   pattern can close the group and escape the anchors.
# - The capsa engine, not these rules, runs the policy's regular
#   expressions, and passes the results in `input.capsa_matches`. regorus
#   clones its cached regex for every `regex.match`, and a clone starts with
#   an empty matching cache, which made each match cost some 100 times what
#   it costs on a regex compiled once; its compiled form (RVM) takes no
#   custom builtins. So the engine compiles every pattern of `policy_data`
#   once, anchored as above, and before each evaluation sets, on its own
#   copy of the request (a value the host sent under that key is replaced,
#   never read):
#     env       for create_container, one boolean per requested env entry:
#               whether it is a string that one of the named container's
#               env patterns matches whole (false, and not computed, for an
#               entry the container lists exactly, which decides first);
#     mounts    for create_container, one boolean per requested mount:
#               whether its source is a string that the source pattern of
#               the container's mount at its destination matches whole;
#     copy_file for copy_file, whether the path is a string that one of
#               the sandbox's copy_file patterns matches whole.
#   The path checks (absolute, no `.` or `..` component) stay here, in
#   `clean_path`. A request without `capsa_matches` (these rules evaluated
#   by another Rego engine) is denied, whatever its op: the rules fail
#   closed rather than assume a match.
# - Hot path: the container is looked up once by name in an object, and
#   each requested mount by destination in an object of the container's
#   mounts; requested environment entries, groups and capabilities are
#   looked up with `in` in the policy's arrays, not in sets built for every
#   request (in the compiled form every loop iteration and every rule or
#   function call costs, so the hot path has few of either); an
#   environment entry listed exactly is accepted before its pattern result
#   is looked at; no regular expression runs in Rego; and an allowed
#   request never evaluates a reason.
# - The engine evaluates a document of exactly these rules and the data
#   compiled to regorus' bytecode (RVM; any other document it interprets),
#   whose semantics differ from Rego's in two places (regorus 0.14), both
#   avoided here and both covered by the decision tests, which compare the
#   compiled form against regorus' interpreter on every case:
#   1. a body followed by `else` that iterates (`some x in xs`, `xs[_]`)
#      and finds nothing does not fall through to the `else`: such bodies
#      use comprehensions instead;
#   2. an array or object comprehension whose term (or last assignment) is
#      undefined yields an undefined element instead of none: every such
#      term here is total.
package capsa.policy

import rego.v1

# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

decision := {"allowed": true, "reasons": []} if {
	schema_ok
	matches_ok
	op_ok
} else := {"allowed": false, "reasons": reasons}

# The rules were written for this schema version and no other.
schema_ok if policy_data.version == 1

# The engine's pattern matches are present (see the header).
matches_ok if is_object(input.capsa_matches)

op_ok if {
	input.op == "create_container"
	create_container_ok
}

op_ok if {
	input.op == "exec_process"
	exec_process_ok
}

op_ok if {
	input.op == "signal_process"
	signal_process_ok
}

op_ok if {
	input.op == "read_stdio"
	container.read_stdio == true
}

op_ok if {
	input.op == "write_stdin"
	container.write_stdin == true
}

op_ok if {
	input.op == "get_logs"
	container
	policy_data.sandbox.get_logs == true
}

op_ok if {
	input.op in sandbox_ops
	policy_data.sandbox[input.op] == true
}

op_ok if {
	input.op == "copy_file"
	copy_file_ok
}

op_ok if {
	input.op == "add_layer"
	add_layer_ok
}

op_ok if {
	input.op == "workload_api"
	workload_api_ok
}

# Starting, waiting for and removing a container cannot change what runs
# (creation decided that), so a container the policy knows is enough; the
# rules still see these requests, so that every host request is decided.
op_ok if {
	input.op in lifecycle_ops
	container
}

known_ops := {
	"add_layer", "create_container", "start_container", "exec_process", "wait_process", "signal_process",
	"read_stdio", "write_stdin", "copy_file", "get_logs", "get_metrics", "remove_container", "shutdown",
	"update_policy", "workload_api",
}

# Operations that name a container in `input.container`.
container_ops := {
	"create_container", "start_container", "exec_process", "wait_process", "signal_process", "read_stdio",
	"write_stdin", "get_logs", "remove_container",
}

# Operations on a known container that need no further permission.
lifecycle_ops := {"start_container", "wait_process", "remove_container"}

# Operations decided by a sandbox-wide boolean alone.
sandbox_ops := {"get_metrics", "shutdown", "update_policy"}

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

reason(rule, field, allowed_value, requested_value, message) := {
	"rule": rule,
	"field": field,
	"allowed": allowed_value,
	"requested": requested_value,
	"message": message,
}

# A request field, or null when absent (reasons must never be undefined).
req(key) := object.get(input, key, null)

# A request field that the rules iterate, or [] when it is not an array.
# Iterating a value of another type is an error for regorus' interpreter
# and undefined for its compiled form; the checks that use these test the
# type themselves, so both forms decide and explain alike.
requested_array(key) := x if {
	x := input[key]
	is_array(x)
} else := []

# Likewise for objects.
requested_object(x) := x if is_object(x)

else := {}

# The element at i, or null past the end.
at(a, i) := a[i] if i < count(a)

else := null

# The variable name of a `NAME=value` entry.
env_name(e) := split(e, "=")[0]

# An environment entry as reasons may show it: the name, never the value.
env_shown(e) := sprintf("%s=<redacted>", [env_name(e)]) if {
	is_string(e)
	contains(e, "=")
} else := e if {
	is_string(e)
} else := sprintf("<%s>", [type_name(e)])

# A policy environment pattern as reasons may show it: what precedes the
# first `=` (the name part) and nothing of the value part.
pattern_shown(p) := sprintf("%s=<redacted pattern>", [env_name(p)]) if {
	contains(p, "=")
} else := "<redacted pattern>"

# An absolute path without `.` or `..` components, so that a pattern such as
# `/run/capsa/copy/.*` cannot be walked out of. (In an absolute path every
# component follows a `/`, so these four tests find every such component.)
clean_path(p) if {
	startswith(p, "/")
	not contains(p, "/./")
	not contains(p, "/../")
	not endswith(p, "/.")
	not endswith(p, "/..")
}

names_text(names) := "none" if count(names) == 0

else := concat(", ", [sprintf("%v", [n]) | some n in names])

# ---------------------------------------------------------------------------
# Request and policy shape
# ---------------------------------------------------------------------------

reasons contains r if {
	not is_object(input)
	r := reason("request.type", "", "object", type_name(input), sprintf("the request must be a JSON object, got %s", [type_name(input)]))
}

reasons contains r if {
	is_object(input)
	not input.op in known_ops
	r := reason("request.op", "op", sort(known_ops), req("op"), op_message)
}

op_message := "the request has no op" if {
	req("op") == null
} else := sprintf("unknown operation %v (the rules know %s)", [req("op"), names_text(sort(known_ops))])

reasons contains r if {
	is_object(input)
	not matches_ok
	r := reason(
		"engine.matches", "capsa_matches", "the pattern matches the capsa engine computes", null,
		"the request carries no pattern matches from the capsa engine, which these rules need",
	)
}

reasons contains r if {
	not schema_ok
	version := object.get(policy_data, "version", null)
	r := reason("policy.version", "version", 1, version, sprintf("the policy data has schema version %v; these rules are for version 1", [version]))
}

# ---------------------------------------------------------------------------
# The container a request names
# ---------------------------------------------------------------------------

# By name, so that every request looks its container up once. Two containers
# with one name make this object a conflict: evaluation fails and every
# request is denied.
containers := {c.name: c | some c in policy_data.containers}

container := containers[input.container]

reasons contains r if {
	input.op in container_ops
	not container
	names := sort(object.keys(containers))
	r := reason(
		sprintf("%s.container", [input.op]), "container", names, req("container"),
		sprintf("container %v is not in the policy, which has: %s", [req("container"), names_text(names)]),
	)
}

# ---------------------------------------------------------------------------
# create_container
# ---------------------------------------------------------------------------

# Only reasons about a known container's creation are explained field by
# field; an unknown container has its own reason above.
creating if {
	input.op == "create_container"
	container
}

create_container_ok if {
	container
	image_ok
	layers_ok
	args_ok
	env_ok
	env_required_ok
	working_dir_ok
	user_ok
	groups_ok
	capabilities_ok
	privileged_ok
	no_new_privileges_ok
	seccomp_ok
	mounts_ok
	read_only_rootfs_ok
	sysctls_ok
}

# --- image: the manifest digest the policy pins ---

image_ok if input.image == container.image_digest

reasons contains r if {
	creating
	not image_ok
	r := reason(
		"create_container.image", "image", container.image_digest, req("image"),
		sprintf("image %v is not %s, the digest the policy pins for %s", [req("image"), container.image_digest, container.image]),
	)
}

# --- layers and args: equal exactly, same count, same order ---

layers_ok if input.layers == container.layers

args_ok if input.args == container.args

reasons contains r if {
	creating
	not layers_ok
	d := list_difference("layers", "layer", container.layers, req("layers"))
	r := reason("create_container.layers", d.field, d.allowed, d.requested, d.message)
}

reasons contains r if {
	creating
	not args_ok
	d := list_difference("args", "argument", container.args, req("args"))
	r := reason("create_container.args", d.field, d.allowed, d.requested, d.message)
}

# Explains how `got` differs from `want`, naming the first index that
# differs and telling an added, missing, swapped or reordered element from a
# different one.
list_difference(name, noun, want, got) := {
	"field": name, "allowed": want, "requested": got,
	"message": sprintf("%s must be an array of strings, got %s", [name, type_name(got)]),
} if {
	not is_array(got)
} else := {
	"field": sprintf("%s[%d]", [name, i]), "allowed": at(want, i), "requested": at(got, i),
	"message": sprintf("%s[%d] and %s[%d] are swapped", [name, i, name, j]),
} if {
	count(want) == count(got)
	diff := [k | some k, w in want; got[k] != w]
	count(diff) == 2
	i := diff[0]
	j := diff[1]
	want[i] == got[j]
	want[j] == got[i]
} else := {
	"field": sprintf("%s[%d]", [name, i]), "allowed": at(want, i), "requested": at(got, i),
	"message": sprintf("the request has the policy's %ss in a different order; the first out of place is %s[%d]", [noun, name, i]),
} if {
	count(want) == count(got)
	sort(want) == sort(got)
	i := first_difference(want, got)
} else := {
	"field": sprintf("%s[%d]", [name, i]), "allowed": null, "requested": at(got, i),
	"message": sprintf("the request has an extra %s at %s[%d], which the policy does not have", [noun, name, i]),
} if {
	count(got) == count(want) + 1
	i := first_difference(want, got)
	without(got, i) == want
} else := {
	"field": sprintf("%s[%d]", [name, i]), "allowed": at(want, i), "requested": null,
	"message": sprintf("the request lacks the policy's %s at %s[%d]", [noun, name, i]),
} if {
	count(got) + 1 == count(want)
	i := first_difference(want, got)
	without(want, i) == got
} else := {
	"field": sprintf("%s[%d]", [name, i]), "allowed": at(want, i), "requested": at(got, i),
	"message": sprintf(
		"%s[%d] differs from the policy (the request has %d %ss, the policy %d)",
		[name, i, count(got), noun, count(want)],
	),
} if {
	i := first_difference(want, got)
} else := {
	"field": name, "allowed": want, "requested": got,
	"message": sprintf("%s differ from the policy", [name]),
}

first_difference(a, b) := min(d) if {
	n := max([count(a), count(b)])
	n > 0
	d := {i | some i in numbers.range(0, n - 1); not same_at(a, b, i)}
	count(d) > 0
}

same_at(a, b, i) if a[i] == b[i]

without(a, i) := array.concat(array.slice(a, 0, i), array.slice(a, i + 1, count(a)))

# --- env: every entry allowed exactly or by a pattern; required names set ---

# Indices of requested entries that the policy does not allow: neither
# exactly nor by a pattern. (`in` on the policy's few exact entries costs
# less than building a set of them for every request.)
env_denied := {i |
	exact := container.env.exact
	some i, e in requested_env
	not e in exact
	not env_pattern_allowed(i, e)
}

requested_env := requested_array("env")

# Whether one of the container's patterns matches the whole of entry i, as
# the engine found (see the header).
env_pattern_allowed(i, e) if {
	is_string(e)
	input.capsa_matches.env[i] == true
}

env_ok if {
	is_array(input.env)
	count(env_denied) == 0
}

env_policy_shown := array.concat(
	sort([env_shown(e) | some e in container.env.exact]),
	[pattern_shown(p) | some p in container.env.patterns],
)

reasons contains r if {
	creating
	not is_array(input.env)
	r := reason(
		"create_container.env", "env", env_policy_shown, sprintf("<%s>", [type_name(req("env"))]),
		sprintf("env must be an array of NAME=value strings, got %s", [type_name(req("env"))]),
	)
}

reasons contains r if {
	creating
	some i in env_denied
	e := input.env[i]
	r := reason(
		"create_container.env", sprintf("env[%d]", [i]), env_policy_shown, env_shown(e),
		env_message(i, e),
	)
}

env_message(i, e) := sprintf("env[%d] must be a NAME=value string, got %s", [i, type_name(e)]) if {
	not is_string(e)
} else := sprintf(
	"env[%d]: the policy allows %s, but not with this value (values are not shown)",
	[i, env_name(e)],
) if {
	env_exact_names[env_name(e)]
} else := sprintf(
	"env[%d]: %s matches no entry or pattern of the policy (values are not shown)",
	[i, env_shown(e)],
)

env_exact_names := {env_name(e) | some e in container.env.exact}

env_missing := {n | some n in container.env.required; not env_sets(n)}

# Whether a requested entry has the name n, what precedes its first `=`:
# the entry is n itself or starts with `n=` (so a name never holds `=`).
# One builtin call over the requested strings costs less than building the
# set of their names for every request.
env_sets(n) if {
	not contains(n, "=")
	strings.any_prefix_match(requested_env_strings, concat("", [n, "="]))
}

env_sets(n) if {
	not contains(n, "=")
	n in requested_env
}

requested_env_strings := [e | some e in requested_env; is_string(e)]

# The names the request sets, for reasons only.
env_names := {split(e, "=")[0] | some e in requested_env_strings}

env_required_ok if count(env_missing) == 0

reasons contains r if {
	creating
	some n in env_missing
	r := reason(
		"create_container.env_required", "env", sort(container.env.required), sort(env_names),
		sprintf("the policy requires the variable %s, which the request does not set", [n]),
	)
}

# --- working directory ---

working_dir_ok if input.working_dir == container.working_dir

reasons contains r if {
	creating
	not working_dir_ok
	r := reason(
		"create_container.working_dir", "working_dir", container.working_dir, req("working_dir"),
		sprintf("working directory %v is not %v", [req("working_dir"), container.working_dir]),
	)
}

# --- user: uid and gid equal, supplementary groups a subset ---

user_ok if {
	input.user.uid == container.user.uid
	input.user.gid == container.user.gid
}

requested_user := object.get(input, "user", null)

reasons contains r if {
	creating
	not is_object(requested_user)
	r := reason(
		"create_container.user", "user", container.user, requested_user,
		sprintf("user must be an object with uid, gid and groups, got %s", [type_name(requested_user)]),
	)
}

reasons contains r if {
	creating
	is_object(requested_user)
	some id in ["uid", "gid"]
	got := object.get(requested_user, id, null)
	got != container.user[id]
	r := reason(
		"create_container.user", sprintf("user.%s", [id]), container.user[id], got,
		id_message(sprintf("user.%s", [id]), got, container.user[id]),
	)
}

id_message(field, got, want) := sprintf("%s must be a number, got %s", [field, type_name(got)]) if {
	not is_number(got)
} else := sprintf("%s %v is not %v", [field, got, want])

requested_groups := object.get(requested_object(requested_user), "groups", [])

groups_denied := {i |
	is_array(requested_groups)
	allowed := container.user.groups
	some i, g in requested_groups
	not g in allowed
}

groups_ok if {
	is_array(requested_groups)
	count(groups_denied) == 0
}

reasons contains r if {
	creating
	is_object(requested_user)
	not is_array(requested_groups)
	r := reason(
		"create_container.user", "user.groups", container.user.groups, requested_groups,
		sprintf("user.groups must be an array of group IDs, got %s", [type_name(requested_groups)]),
	)
}

reasons contains r if {
	creating
	some i in groups_denied
	g := requested_groups[i]
	r := reason(
		"create_container.user", sprintf("user.groups[%d]", [i]), container.user.groups, g,
		sprintf("supplementary group %v is not among the policy's groups", [g]),
	)
}

# --- capabilities: the request may hold fewer, never more ---

capabilities_denied := {i |
	allowed := container.capabilities
	some i, c in requested_array("capabilities")
	not c in allowed
}

capabilities_ok if {
	is_array(input.capabilities)
	count(capabilities_denied) == 0
}

reasons contains r if {
	creating
	not is_array(req("capabilities"))
	r := reason(
		"create_container.capabilities", "capabilities", container.capabilities, req("capabilities"),
		sprintf("capabilities must be an array of names, got %s", [type_name(req("capabilities"))]),
	)
}

reasons contains r if {
	creating
	some i in capabilities_denied
	c := input.capabilities[i]
	r := reason(
		"create_container.capabilities", sprintf("capabilities[%d]", [i]), container.capabilities, c,
		sprintf("capability %v is not among those the policy allows", [c]),
	)
}

# --- booleans: privileged, no_new_privileges, read_only_rootfs ---
# Each is written as the cases that are acceptable; a string "true", a
# missing field or any other value matches none of them.

privileged_ok if input.privileged == false

privileged_ok if {
	input.privileged == true
	container.privileged == true
}

no_new_privileges_ok if input.no_new_privileges == true

no_new_privileges_ok if {
	input.no_new_privileges == false
	container.no_new_privileges == false
}

read_only_rootfs_ok if input.read_only_rootfs == true

read_only_rootfs_ok if {
	input.read_only_rootfs == false
	container.read_only_rootfs == false
}

reasons contains r if {
	creating
	some check in boolean_checks
	not check.ok
	got := req(check.field)
	r := reason(
		sprintf("create_container.%s", [check.field]), check.field, check.allowed, got,
		boolean_message(check, got),
	)
}

boolean_checks := [
	{
		"field": "privileged", "ok": privileged_ok_value,
		"allowed": container.privileged, "needs": "false unless the policy allows a privileged container",
	},
	{
		"field": "no_new_privileges", "ok": no_new_privileges_ok_value,
		"allowed": container.no_new_privileges, "needs": "true, as the policy requires",
	},
	{
		"field": "read_only_rootfs", "ok": read_only_rootfs_ok_value,
		"allowed": container.read_only_rootfs, "needs": "true, as the policy requires a read-only root filesystem",
	},
]

default privileged_ok_value := false

privileged_ok_value if privileged_ok

default no_new_privileges_ok_value := false

no_new_privileges_ok_value if no_new_privileges_ok

default read_only_rootfs_ok_value := false

read_only_rootfs_ok_value if read_only_rootfs_ok

boolean_message(check, got) := sprintf("%s must be a boolean, got %s", [check.field, type_name(got)]) if {
	not is_boolean(got)
} else := sprintf("%s is %v; it must be %s", [check.field, got, check.needs])

# --- seccomp: when the policy pins a profile, the request must carry it ---

policy_seccomp := object.get(container, "seccomp_profile_sha256", null)

requested_seccomp := req("seccomp_profile_sha256")

seccomp_ok if {
	policy_seccomp == null
	requested_seccomp == null
}

# A profile the policy does not ask for only restricts the container further.
seccomp_ok if {
	policy_seccomp == null
	is_string(requested_seccomp)
}

seccomp_ok if {
	is_string(policy_seccomp)
	requested_seccomp == policy_seccomp
}

reasons contains r if {
	creating
	not seccomp_ok
	r := reason(
		"create_container.seccomp", "seccomp_profile_sha256", policy_seccomp, requested_seccomp,
		seccomp_message,
	)
}

seccomp_message := "the policy requires a seccomp profile, and the request carries none" if {
	requested_seccomp == null
} else := sprintf("seccomp profile %v is not the one the policy pins (%v)", [requested_seccomp, policy_seccomp])

# --- mounts: every requested mount must match a policy mount ---

# Indices of the requested mounts that match the policy mount at their
# destination: its type, its source, and its options. Every option the
# policy names (such as `ro`) must be present, and `rw` may not stand beside
# a policy `ro`: the host can never make a read-only mount writable. (One
# comprehension without calls: in the compiled form each call costs about as
# much as the checks; `mount_problem` explains a denial in the same terms.)
mounts_allowed := {i |
	some i, m in requested_array("mounts")
	p := policy_mounts[m.destination]
	m.type == p.type
	source_matches(i, p.source, m.source)
	is_array(m.options)
	every o in p.options {
		o in m.options
	}
	["ro" in p.options, "rw" in m.options] != [true, true]
}

mounts_denied := {i | some i, _ in requested_array("mounts"); not i in mounts_allowed}

mounts_ok if {
	is_array(input.mounts)
	count(mounts_allowed) == count(input.mounts)
}

# Policy mounts by destination: one lookup per requested mount. (The engine
# refuses policy data with two mounts at one destination in a container.)
policy_mounts := {p.destination: p | some p in container.mounts}

# The source of requested mount i against policy source s, that of the
# policy mount at the same destination: equal to an exact source, or a
# clean absolute path that the pattern matches whole, as the engine found
# (see the header).
source_matches(_, s, src) if src == s.exact

source_matches(i, s, src) if {
	is_string(s.pattern)
	is_string(src)
	clean_path(src)
	input.capsa_matches.mounts[i] == true
}

# For the explanation of a denied mount; `mount_allowed` checks the same.
writable_over_read_only(p, m) if {
	"ro" in p.options
	"rw" in m.options
}

reasons contains r if {
	creating
	not is_array(req("mounts"))
	r := reason(
		"create_container.mounts", "mounts", container.mounts, req("mounts"),
		sprintf("mounts must be an array of mounts, got %s", [type_name(req("mounts"))]),
	)
}

reasons contains r if {
	creating
	some i in mounts_denied
	m := input.mounts[i]
	candidates := [p | some p in container.mounts; p.destination == object.get(requested_object(m), "destination", null)]
	r := reason(
		"create_container.mounts", sprintf("mounts[%d]", [i]), mount_allowed_shown(candidates), m,
		sprintf("mounts[%d]: %s", [i, mount_problem(i, candidates, m)]),
	)
}

mount_allowed_shown(candidates) := candidates if count(candidates) > 0

else := sort([p.destination | some p in container.mounts])

mount_problem(i, candidates, m) := sprintf("a mount must be an object, got %s", [type_name(m)]) if {
	not is_object(m)
} else := sprintf(
	"nothing may be mounted at %v; the policy allows mounts at: %s",
	[object.get(m, "destination", null), names_text(sort([p.destination | some p in container.mounts]))],
) if {
	count(candidates) == 0
} else := mount_mismatch(i, candidates[0], m)

mount_mismatch(i, p, m) := sprintf("type %v is not %v", [object.get(m, "type", null), p.type]) if {
	object.get(m, "type", null) != p.type
} else := sprintf("source %v is not %v", [object.get(m, "source", null), p.source.exact]) if {
	is_string(p.source.exact)
	not source_matches(i, p.source, object.get(m, "source", null))
} else := sprintf(
	"source %v does not match the pattern %v as a clean absolute path",
	[object.get(m, "source", null), p.source.pattern],
) if {
	not source_matches(i, p.source, object.get(m, "source", null))
} else := sprintf("%v is writable (rw) but the policy mounts it read-only", [p.destination]) if {
	writable_over_read_only(p, m)
} else := sprintf(
	"options %v lack %v, which the policy requires at %v",
	[object.get(m, "options", null), missing, p.destination],
) if {
	is_array(m.options)
	missing := [o | some o in p.options; not o in m.options]
	count(missing) > 0
} else := sprintf("options must be an array of strings, got %v", [object.get(m, "options", null)])

# --- sysctls: each requested one must be in the policy with that value ---

requested_sysctls := object.get(input, "sysctls", {})

policy_sysctls := object.get(container, "sysctls", {})

sysctl_allowed(k, v) if policy_sysctls[k] == v

sysctls_denied := {k | some k, v in requested_object(requested_sysctls); not sysctl_allowed(k, v)}

sysctls_ok if {
	is_object(requested_sysctls)
	count(sysctls_denied) == 0
}

reasons contains r if {
	creating
	not is_object(requested_sysctls)
	r := reason(
		"create_container.sysctls", "sysctls", policy_sysctls, requested_sysctls,
		sprintf("sysctls must be an object of names to values, got %s", [type_name(requested_sysctls)]),
	)
}

reasons contains r if {
	creating
	some k in sysctls_denied
	r := reason(
		"create_container.sysctls", sprintf("sysctls.%v", [k]), object.get(policy_sysctls, k, null),
		requested_sysctls[k], sysctl_message(k),
	)
}

sysctl_message(k) := sprintf("sysctl %v is set to %v; the policy allows only %v", [k, requested_sysctls[k], policy_sysctls[k]]) if {
	policy_sysctls[k]
} else := sprintf("sysctl %v is not in the policy", [k])

# ---------------------------------------------------------------------------
# exec_process: exactly one of the container's listed commands
# ---------------------------------------------------------------------------

exec_process_ok if {
	is_array(input.args)
	some command in container.exec
	command == input.args
}

reasons contains r if {
	input.op == "exec_process"
	container
	not exec_process_ok
	r := reason("exec_process.args", "args", container.exec, req("args"), exec_message)
}

exec_message := sprintf("args must be an array of strings, got %s", [type_name(req("args"))]) if {
	not is_array(req("args"))
} else := sprintf(
	"command %v is not among the %d commands the policy allows in container %v",
	[req("args"), count(container.exec), input.container],
)

# ---------------------------------------------------------------------------
# signal_process: a signal the container's policy lists
# ---------------------------------------------------------------------------

signal_process_ok if {
	is_number(input.signal)
	some s in container.signals
	s == input.signal
}

reasons contains r if {
	input.op == "signal_process"
	container
	not signal_process_ok
	r := reason("signal_process.signal", "signal", container.signals, req("signal"), signal_message)
}

signal_message := sprintf("signal must be a number, got %s", [type_name(req("signal"))]) if {
	not is_number(req("signal"))
} else := sprintf("signal %v may not be sent to container %v", [req("signal"), input.container])

# ---------------------------------------------------------------------------
# Per-container and sandbox-wide permissions
# ---------------------------------------------------------------------------

reasons contains r if {
	input.op in {"read_stdio", "write_stdin"}
	container
	not container[input.op] == true
	r := reason(
		sprintf("%s.permission", [input.op]), input.op, object.get(container, input.op, null), true,
		sprintf("the policy does not allow %s for container %v", [input.op, input.container]),
	)
}

reasons contains r if {
	input.op in {"get_logs", "get_metrics", "shutdown", "update_policy"}
	not policy_data.sandbox[input.op] == true
	r := reason(
		sprintf("%s.permission", [input.op]), sprintf("sandbox.%s", [input.op]),
		object.get(policy_data.sandbox, input.op, null), true,
		sprintf("the policy does not allow %s", [input.op]),
	)
}

# ---------------------------------------------------------------------------
# copy_file: a clean absolute path that a policy pattern matches whole
# ---------------------------------------------------------------------------

# The engine matched the path against the patterns (see the header).
copy_file_ok if {
	is_string(input.path)
	clean_path(input.path)
	input.capsa_matches.copy_file == true
}

reasons contains r if {
	input.op == "copy_file"
	not copy_file_ok
	r := reason(
		"copy_file.path", "path", policy_data.sandbox.copy_file, req("path"),
		copy_file_message,
	)
}

copy_file_message := sprintf("path must be a string, got %s", [type_name(req("path"))]) if {
	not is_string(req("path"))
} else := sprintf("path %v must be absolute, without . or .. components", [req("path")]) if {
	not clean_path(req("path"))
} else := sprintf("path %v matches none of the policy's copy_file patterns", [req("path")])

# ---------------------------------------------------------------------------
# add_layer: a layer of one of the policy's containers
# ---------------------------------------------------------------------------

# Every diff_id of every container. The agent checks that the streamed bytes
# hash to the diff_id; this check keeps layers no container may use (and
# the space they take) out of the sandbox.
policy_layers := {l | some c in policy_data.containers; some l in c.layers}

add_layer_ok if {
	is_string(input.diff_id)
	input.diff_id in policy_layers
}

reasons contains r if {
	input.op == "add_layer"
	not add_layer_ok
	r := reason("add_layer.diff_id", "diff_id", sort(policy_layers), req("diff_id"), add_layer_message)
}

add_layer_message := sprintf("diff_id must be a string, got %s", [type_name(req("diff_id"))]) if {
	not is_string(req("diff_id"))
} else := sprintf("layer %v is not a layer of any container in the policy", [req("diff_id")])

# ---------------------------------------------------------------------------
# workload_api: an endpoint the policy lists
# ---------------------------------------------------------------------------

# The endpoints the pod's containers may call. Data written before the field
# existed allows all four, as the data model reads it (schema version 1):
# rules and model must agree on what a document allows.
policy_workload_api := object.get(
	policy_data.sandbox, "workload_api",
	["status", "attest/raw", "attest/maa", "key/release"],
)

workload_api_ok if {
	is_string(input.endpoint)
	input.endpoint in policy_workload_api
}

reasons contains r if {
	input.op == "workload_api"
	not workload_api_ok
	r := reason("workload_api.endpoint", "endpoint", policy_workload_api, req("endpoint"), workload_api_message)
}

workload_api_message := sprintf("endpoint must be a string, got %s", [type_name(req("endpoint"))]) if {
	not is_string(req("endpoint"))
} else := sprintf(
	"the policy does not allow the workload API endpoint %v; it allows: %s",
	[req("endpoint"), names_text(policy_workload_api)],
)

policy_data := {
  "version": 1,
  "containers": [
    {
      "name": "app",
      "image": "REGISTRY/test/busybox:1",
      "image_digest": "<busybox-manifest>",
      "layers": [
        "<busybox-layer-0>",
        "<busybox-layer-1>",
        "<busybox-layer-2>"
      ],
      "args": [
        "/bin/sh",
        "-c",
        "echo hello from ACI"
      ],
      "env": {
        "exact": [
          "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
          "MODE=production"
        ],
        "patterns": [
          "HOSTNAME=[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?",
          "KUBERNETES_SERVICE_HOST=[0-9a-fA-F.:]+",
          "KUBERNETES_SERVICE_PORT(_HTTPS)?=[0-9]{1,5}",
          "KUBERNETES_PORT(_443_TCP)?=tcp://[0-9a-fA-F.:\\[\\]]+(:[0-9]{1,5})?",
          "KUBERNETES_PORT_443_TCP_(PROTO=tcp|PORT=[0-9]{1,5}|ADDR=[0-9a-fA-F.:]+)",
          "[A-Z0-9_]+_SERVICE_HOST=[0-9a-fA-F.:]+",
          "[A-Z0-9_]+_SERVICE_PORT(_[A-Z0-9_]+)?=[0-9]{1,5}",
          "[A-Z0-9_]+_PORT=(tcp|udp|sctp)://[0-9a-fA-F.:\\[\\]]+:[0-9]{1,5}",
          "[A-Z0-9_]+_PORT_[0-9]+_(TCP|UDP|SCTP)(_PROTO=(tcp|udp|sctp)|_PORT=[0-9]{1,5}|_ADDR=[0-9a-fA-F.:]+)?(=(tcp|udp|sctp)://[0-9a-fA-F.:\\[\\]]+:[0-9]{1,5})?",
          "API_KEY=.*"
        ],
        "required": []
      },
      "working_dir": "/",
      "user": {
        "uid": 0,
        "gid": 0,
        "groups": []
      },
      "capabilities": [
        "CAP_AUDIT_WRITE",
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_MKNOD",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_RAW",
        "CAP_SETFCAP",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_SETUID",
        "CAP_SYS_CHROOT"
      ],
      "privileged": false,
      "no_new_privileges": false,
      "seccomp_profile_sha256": null,
      "mounts": [
        {
          "destination": "/proc",
          "type": "proc",
          "source": {
            "exact": "proc"
          },
          "options": [
            "nosuid",
            "noexec",
            "nodev"
          ]
        },
        {
          "destination": "/dev",
          "type": "tmpfs",
          "source": {
            "exact": "tmpfs"
          },
          "options": [
            "nosuid"
          ]
        },
        {
          "destination": "/dev/pts",
          "type": "devpts",
          "source": {
            "exact": "devpts"
          },
          "options": [
            "nosuid",
            "noexec"
          ]
        },
        {
          "destination": "/dev/shm",
          "type": "tmpfs",
          "source": {
            "exact": "shm"
          },
          "options": [
            "nosuid",
            "noexec",
            "nodev"
          ]
        },
        {
          "destination": "/dev/mqueue",
          "type": "mqueue",
          "source": {
            "exact": "mqueue"
          },
          "options": [
            "nosuid",
            "noexec",
            "nodev"
          ]
        },
        {
          "destination": "/sys",
          "type": "sysfs",
          "source": {
            "exact": "sysfs"
          },
          "options": [
            "nosuid",
            "noexec",
            "nodev",
            "ro"
          ]
        },
        {
          "destination": "/data",
          "type": "bind",
          "source": {
            "pattern": "/run/capsa/sandboxes/[a-z0-9-]+/volumes/data"
          },
          "options": [
            "rw"
          ]
        }
      ],
      "read_only_rootfs": false,
      "sysctls": {},
      "exec": [
        [
          "cat",
          "/tmp/ready"
        ]
      ],
      "signals": [
        9,
        15
      ],
      "read_stdio": true,
      "write_stdin": false
    }
  ],
  "sandbox": {
    "copy_file": [],
    "get_logs": true,
    "get_metrics": true,
    "shutdown": true,
    "update_policy": false,
    "workload_api": [
      "status",
      "attest/raw",
      "attest/maa",
      "key/release"
    ]
  }
}
