//! Which kernel modules the guest loads, and in what order.
//!
//! The guest's agent loads its modules itself (there is no modprobe in the
//! initramfs), so the order is worked out here, on the host: every module
//! after the modules it depends on, each once, and nothing for what is
//! built in. The dependencies come from `modules.dep` when the tree has one,
//! or else from each module's own `.modinfo` section (`depends=`), which is
//! what depmod reads: Debian's kernel packages ship no `modules.dep` (depmod
//! writes it at install time), and the host need not have kmod.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use object::{Object as _, ObjectSection as _};

/// Why the module set could not be worked out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModulesError {
    /// A line of `modules.dep` is not `path: [dep ...]`.
    #[error("modules.dep line {line}: {reason}")]
    Parse {
        /// 1-based.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A wanted module (or a dependency) is neither a module nor built in.
    #[error("kernel module {name} is neither in modules.dep nor built in: is this the kernel the guest boots?")]
    Unknown {
        /// Its name.
        name: String,
    },
    /// A module file could not be read.
    #[error("kernel module {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Dependencies loop.
    #[error("kernel modules depend on each other in a loop through {name}")]
    Cycle {
        /// A module on the loop.
        name: String,
    },
}

/// A module to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Its name (`virtio_blk`), with `-` written `_` as the kernel does.
    pub name: String,
    /// Its file, relative to `/lib/modules/<release>/` (`kernel/.../x.ko.xz`).
    pub path: String,
}

/// The kernel's module index.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    modules: BTreeMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
}

/// A module's name from its path: the file name up to `.ko`, `-` as `_`.
pub fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleIndex {
    /// From the text of `modules.dep` and of `modules.builtin` (one path per
    /// line; empty if unknown).
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> Result<Self, ModulesError> {
        let mut modules = BTreeMap::new();
        for (i, line) in modules_dep.lines().enumerate() {
            let line_no = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let (path, deps) = line
                .split_once(':')
                .ok_or_else(|| ModulesError::Parse { line: line_no, reason: "no `:` after the module path".into() })?;
            let path = path.trim();
            if !path.contains(".ko") {
                return Err(ModulesError::Parse { line: line_no, reason: format!("{path:?} is not a module file") });
            }
            let deps = deps.split_whitespace().map(name_of).collect();
            if modules.insert(name_of(path), (path.to_owned(), deps)).is_some() {
                return Err(ModulesError::Parse {
                    line: line_no,
                    reason: format!("module {} listed twice", name_of(path)),
                });
            }
        }
        let builtin = modules_builtin.lines().filter(|l| !l.trim().is_empty()).map(|l| name_of(l.trim())).collect();
        Ok(Self { modules, builtin })
    }

    /// From a module tree (`/lib/modules/<release>`): its `modules.dep`
    /// when present, otherwise every `*.ko` file's `.modinfo`; and its
    /// `modules.builtin` when present.
    pub fn from_tree(root: &Path) -> Result<Self, ModulesError> {
        let read = |name: &str| std::fs::read_to_string(root.join(name)).ok();
        let builtin = read("modules.builtin").unwrap_or_default();
        if let Some(dep) = read("modules.dep") {
            return Self::parse(&dep, &builtin);
        }
        let mut index = Self::parse("", &builtin)?;
        let mut files = Vec::new();
        collect_modules(root, root, &mut files)?;
        files.sort();
        for path in files {
            let (name, deps) = modinfo(&root.join(&path), &path)?;
            index.modules.insert(name, (path, deps));
        }
        Ok(index)
    }

    /// `wanted` and everything they need, dependencies first, each once;
    /// built-in modules are left out (there is nothing to load).
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<Module>, ModulesError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for name in wanted {
            self.visit(&name.replace('-', "_"), &mut Vec::new(), &mut done, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<Module>,
    ) -> Result<(), ModulesError> {
        if done.contains(name) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            return Err(ModulesError::Cycle { name: name.to_owned() });
        }
        let Some((file, deps)) = self.modules.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_owned());
                return Ok(());
            }
            return Err(ModulesError::Unknown { name: name.to_owned() });
        };
        path.push(name.to_owned());
        for dep in deps {
            self.visit(dep, path, done, order)?;
        }
        path.pop();
        done.insert(name.to_owned());
        order.push(Module { name: name.to_owned(), path: file.clone() });
        Ok(())
    }
}

fn file_error(path: &str, reason: impl ToString) -> ModulesError {
    ModulesError::File { path: path.to_owned(), reason: reason.to_string() }
}

/// Paths (relative to `root`) of every `*.ko` below `dir`.
fn collect_modules(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), ModulesError> {
    let shown = dir.display().to_string();
    for entry in std::fs::read_dir(dir).map_err(|e| file_error(&shown, e))? {
        let entry = entry.map_err(|e| file_error(&shown, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| file_error(&shown, e))?;
        if kind.is_dir() {
            collect_modules(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "ko") {
            let relative = path.strip_prefix(root).map_err(|e| file_error(&shown, e))?;
            out.push(relative.to_string_lossy().into_owned());
        } else if path.to_string_lossy().contains(".ko.") {
            return Err(file_error(
                &path.display().to_string(),
                "compressed modules need a modules.dep beside them (run depmod), as their .modinfo cannot be read in place",
            ));
        }
    }
    Ok(())
}

/// A module's name and its `depends=` from its ELF `.modinfo` section
/// (NUL-separated `key=value` strings).
fn modinfo(file: &Path, shown: &str) -> Result<(String, Vec<String>), ModulesError> {
    let handle = std::fs::File::open(file).map_err(|e| file_error(shown, e))?;
    // Read lazily: only the headers and the one section, not the whole file.
    let cache = object::read::ReadCache::new(handle);
    let elf = object::File::parse(&cache).map_err(|e| file_error(shown, e))?;
    let section = elf.section_by_name(".modinfo").ok_or_else(|| file_error(shown, "has no .modinfo section"))?;
    let data = section.data().map_err(|e| file_error(shown, e))?;
    let mut name = None;
    let mut deps = Vec::new();
    for field in data.split(|b| *b == 0) {
        let field = String::from_utf8_lossy(field);
        if let Some(value) = field.strip_prefix("name=") {
            name = Some(value.replace('-', "_"));
        } else if let Some(value) = field.strip_prefix("depends=") {
            deps = value.split(',').filter(|d| !d.is_empty()).map(|d| d.replace('-', "_")).collect();
        }
    }
    Ok((name.unwrap_or_else(|| name_of(shown)), deps))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shape of Debian 12's modules.dep (6.1, xz-compressed modules).
    const DEP: &str = "\
kernel/drivers/md/dm-verity.ko.xz: kernel/drivers/md/dm-bufio.ko.xz kernel/lib/reed_solomon/reed_solomon.ko.xz kernel/drivers/md/dm-mod.ko.xz
kernel/drivers/md/dm-bufio.ko.xz: kernel/drivers/md/dm-mod.ko.xz
kernel/drivers/md/dm-mod.ko.xz:
kernel/lib/reed_solomon/reed_solomon.ko.xz:
kernel/drivers/md/dm-crypt.ko.xz: kernel/drivers/md/dm-mod.ko.xz
kernel/fs/overlayfs/overlay.ko.xz:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz kernel/net/vmw_vsock/vsock.ko.xz
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz: kernel/net/vmw_vsock/vsock.ko.xz
kernel/net/vmw_vsock/vsock.ko.xz:
";
    const BUILTIN: &str = "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n";

    fn names(modules: &[Module]) -> Vec<&str> {
        modules.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn dependencies_come_first_each_once() {
        let index = ModuleIndex::parse(DEP, BUILTIN).unwrap();
        let order = index.load_order(&["dm-verity", "dm_crypt", "overlay", "vmw_vsock_virtio_transport"]).unwrap();
        assert_eq!(
            names(&order),
            [
                "dm_mod",
                "dm_bufio",
                "reed_solomon",
                "dm_verity",
                "dm_crypt",
                "overlay",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport"
            ]
        );
        assert_eq!(order[3].path, "kernel/drivers/md/dm-verity.ko.xz");
    }

    #[test]
    fn built_in_modules_need_no_loading_and_unknown_ones_are_named() {
        let index = ModuleIndex::parse(DEP, BUILTIN).unwrap();
        assert_eq!(index.load_order(&["virtio", "overlay"]).unwrap().len(), 1);
        assert_eq!(index.load_order(&["erofs"]), Err(ModulesError::Unknown { name: "erofs".into() }));
    }

    #[test]
    fn a_tree_with_modules_dep_uses_it_and_compressed_modules_need_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.dep"), DEP).unwrap();
        std::fs::write(dir.path().join("modules.builtin"), BUILTIN).unwrap();
        let index = ModuleIndex::from_tree(dir.path()).unwrap();
        assert_eq!(names(&index.load_order(&["dm_crypt", "virtio"]).unwrap()), ["dm_mod", "dm_crypt"]);
        std::fs::remove_file(dir.path().join("modules.dep")).unwrap();
        std::fs::create_dir_all(dir.path().join("kernel/fs")).unwrap();
        std::fs::write(dir.path().join("kernel/fs/overlay.ko.xz"), b"").unwrap();
        let err = ModuleIndex::from_tree(dir.path()).unwrap_err().to_string();
        assert!(err.contains("run depmod"), "{err}");
        std::fs::remove_file(dir.path().join("kernel/fs/overlay.ko.xz")).unwrap();
        std::fs::write(dir.path().join("kernel/fs/overlay.ko"), b"not an ELF file").unwrap();
        assert!(matches!(ModuleIndex::from_tree(dir.path()), Err(ModulesError::File { .. })));
    }

    /// The Debian kernel's module tree: `CAPSA_GUEST_MODULES`, or the newest
    /// under /lib/modules.
    #[test]
    fn a_real_kernel_tree_resolves_the_guest_modules() {
        let installed = || {
            let mut trees: Vec<_> = std::fs::read_dir("/lib/modules")
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("modules.builtin").is_file())
                .collect();
            trees.sort();
            trees.pop().map(std::path::PathBuf::into_os_string)
        };
        let Some(root) = std::env::var_os("CAPSA_GUEST_MODULES").or_else(installed) else {
            assert!(
                std::env::var_os("CAPSA_REQUIRE_TOOLS").is_none(),
                "no kernel module tree (CAPSA_REQUIRE_TOOLS is set)"
            );
            eprintln!("SKIPPED: no kernel module tree (install linux-image-amd64 or set CAPSA_GUEST_MODULES)");
            return;
        };
        let index = ModuleIndex::from_tree(Path::new(&root)).unwrap();
        let order = index
            .load_order(&[
                "virtio_pci",
                "virtio_console",
                "vmw_vsock_virtio_transport",
                "overlay",
                "dm_verity",
                "dm_crypt",
                "erofs",
                "fuse",
            ])
            .unwrap();
        let position = |n: &str| order.iter().position(|m| m.name == n);
        for (before, after) in [("dm_mod", "dm_verity"), ("vsock", "vmw_vsock_virtio_transport")] {
            if let (Some(b), Some(a)) = (position(before), position(after)) {
                assert!(b < a, "{before} must load before {after}: {:?}", names(&order));
            }
        }
        eprintln!("load order: {:?}", names(&order));
    }

    #[test]
    fn loops_and_malformed_lines_are_refused() {
        let looped = ModuleIndex::parse("a.ko: b.ko\nb.ko: a.ko\n", "").unwrap();
        assert!(matches!(looped.load_order(&["a"]), Err(ModulesError::Cycle { .. })));
        assert!(matches!(ModuleIndex::parse("no colon here", ""), Err(ModulesError::Parse { line: 1, .. })));
        assert!(matches!(ModuleIndex::parse("x.ko:\nx.ko:\n", ""), Err(ModulesError::Parse { line: 2, .. })));
        assert!(matches!(ModuleIndex::parse("readme.txt:\n", ""), Err(ModulesError::Parse { line: 1, .. })));
    }
}
