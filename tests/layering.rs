//! The crate's folders are its architecture (docs: design §4): edge → api → sched / sessions /
//! files → fleet → wire. Each layer may import the layers below it, never the ones above or
//! beside it, so a change in a low layer never has to reach up, and each layer can be tested
//! without the ones above. Nothing in the compiler keeps that true; this test does.
//!
//! It reads every `.rs` file under `src/`, finds the file's layer from its path, and finds every
//! crate-root module it names through `crate::…` or `super::…` paths (in `use`, grouped `use`,
//! re-exports and ordinary code). Comments and string literals are blanked first, so a doc
//! comment that names a module is not an import. Items under `#[cfg(test)]` are exempt: test
//! fixtures are not part of the product's dependency graph and may build from any layer.
//!
//! The rules are data: adjust `LAYERS`, `SIDEWAYS_ALLOWED` and `WIRING` when the layout moves.

use std::fs;
use std::path::Path;

/// One layer: higher ranks may import lower ones. Layers of the same rank may not import each
/// other unless `SIDEWAYS_ALLOWED` says so. `modules` are crate-root module names.
struct Layer {
    name: &'static str,
    rank: u8,
    modules: &'static [&'static str],
}

#[rustfmt::skip]
const LAYERS: &[Layer] = &[
    Layer { name: "wire",      rank: 0, modules: &["protocol", "http", "comfy_wire", "config", "error", "logfile", "metrics"] },
    // A client tool: it may import only the wire.
    Layer { name: "loadtest",  rank: 1, modules: &["loadtest"] },
    Layer { name: "fleet",     rank: 2, modules: &["fleet"] },
    // Beside each other: the client sockets and the gate's files; the scheduler uses both.
    Layer { name: "sessions",  rank: 3, modules: &["sessions"] },
    Layer { name: "files",     rank: 3, modules: &["files"] },
    Layer { name: "sched",     rank: 4, modules: &["sched"] },
    Layer { name: "api",       rank: 5, modules: &["api"] },
    // Beside api: it reads sched and fleet, never the client routes.
    Layer { name: "admin",     rank: 5, modules: &["admin"] },
    Layer { name: "edge",      rank: 6, modules: &["edge"] },
];

/// Same-rank imports allowed anyway, as (importing layer, imported layer).
const SIDEWAYS_ALLOWED: &[(&str, &str)] = &[];

/// Crate-root files and folders that connect everything: they may import any layer, and no
/// layer may import them. `bin` holds other crates' roots.
const WIRING: &[&str] = &["lib", "main", "demo", "bin", "reload", "service"];

fn layer_of(module: &str) -> Option<&'static Layer> {
    LAYERS.iter().find(|layer| layer.modules.contains(&module))
}

/// The rule: a layer may import itself, any lower layer, and same-rank layers listed in
/// `SIDEWAYS_ALLOWED`.
fn may_import(from: &Layer, to: &Layer) -> bool {
    let sideways_ok = SIDEWAYS_ALLOWED.contains(&(from.name, to.name));
    from.name == to.name || to.rank < from.rank || (to.rank == from.rank && sideways_ok)
}

/// (line, crate-root module) for each path that names one; the module is `*` for a glob of the
/// crate root.
type Import = (usize, String);

/// Every layering problem in one file; `rel` is its path under `src/`, with `/` separators.
fn check_file(rel: &str, source: &str) -> Vec<String> {
    let top = rel.split('/').next().unwrap_or(rel).trim_end_matches(".rs");
    if WIRING.contains(&top) {
        return Vec::new();
    }
    let Some(layer) = layer_of(top) else {
        let problem = format!("src/{rel} is in no layer (add its folder to LAYERS, or move it)");
        return vec![problem];
    };
    let mut found = imports(&module_path(rel), source);
    found.dedup();
    let mut problems = Vec::new();
    for (line, module) in found.into_iter().filter(|(_, module)| module != top) {
        let from = layer.name;
        let at = format!("src/{rel}:{line}: layer {from}");
        problems.push(match layer_of(&module) {
            _ if module == "*" || WIRING.contains(&module.as_str()) => {
                format!("{at} imports the wiring via crate::{module}")
            }
            None => format!("{at} imports crate::{module}, which is in no layer"),
            Some(to) if may_import(layer, to) => continue,
            Some(to) => {
                let up = to.rank > layer.rank;
                let place = if up { "above" } else { "beside" };
                let to = to.name;
                format!("{at} imports layer {to} ({to} is {place} {from}) via crate::{module}")
            }
        });
    }
    problems
}

/// The module a file defines: `sched/dispatch.rs` → [sched, dispatch], `sched/mod.rs` → [sched],
/// `lib.rs` → [] (the crate root).
fn module_path(rel: &str) -> Vec<String> {
    let rel = rel.trim_end_matches(".rs");
    let mut parts: Vec<String> = rel.split('/').map(String::from).collect();
    if parts.last().is_some_and(|last| last == "mod") || parts == ["lib"] || parts == ["main"] {
        parts.pop();
    }
    parts
}

/// The crate-root modules that `source`, defining `own_module`, names through `crate::` or
/// `super::` paths, skipping comments, literals and `#[cfg(test)]` items.
fn imports(own_module: &[String], source: &str) -> Vec<Import> {
    const CFG_TEST: [&str; 6] = ["[", "cfg", "(", "test", ")", "]"];
    let toks = tokens(&blank_comments_and_literals(source));
    let text = |k: usize| toks.get(k).map_or("", |tok| tok.text.as_str());
    let is_cfg_test = |k: usize| CFG_TEST.iter().zip(k..).all(|(want, n)| text(n) == *want);
    let (mut found, mut depth, mut i) = (Vec::new(), 0usize, 0usize);
    let mut inline_mods: Vec<(String, usize)> = Vec::new();
    while i < toks.len() {
        match text(i) {
            "#" if text(i + 1) == "!" && is_cfg_test(i + 2) => return Vec::new(),
            "#" if is_cfg_test(i + 1) => {
                i = end_of_item(&toks, i + 7);
                continue;
            }
            "mod" if text(i + 2) == "{" => inline_mods.push((text(i + 1).into(), depth)),
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline_mods.last().is_some_and(|(_, at)| *at == depth) {
                    inline_mods.pop();
                }
            }
            word @ ("crate" | "super")
                if text(i + 1) == "::" && text(i.wrapping_sub(1)) != "::" =>
            {
                let mut base: Vec<String> = Vec::new();
                if word == "super" {
                    base = own_module.to_vec();
                    base.extend(inline_mods.iter().map(|m| m.0.clone()));
                    base.pop();
                }
                let mut j = i + 2;
                while text(j) == "super" && text(j + 1) == "::" {
                    base.pop();
                    j += 2;
                }
                match base.first() {
                    Some(module) => found.push((toks[i].line, module.clone())),
                    None => found.extend(path_heads(&toks, j)),
                }
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// The first segment of the path at `start`, or of each path in a group `{a, b::c, d::{e}}`.
fn path_heads(toks: &[Token], start: usize) -> Vec<Import> {
    let is_head =
        |tok: &Token| tok.text == "*" || (tok.text != "self" && tok.text.starts_with(is_word));
    let head = |tok: &Token| (tok.line, tok.text.clone());
    match toks.get(start) {
        Some(first) if first.text != "{" => {
            return is_head(first).then(|| head(first)).into_iter().collect();
        }
        None => return Vec::new(),
        Some(_) => {}
    }
    let (mut heads, mut depth) = (Vec::new(), 0);
    for pair in toks[start..].windows(2) {
        depth += match pair[0].text.as_str() {
            "{" => 1,
            "}" => -1,
            _ => 0,
        };
        if depth == 0 {
            break;
        }
        if depth == 1 && (pair[0].text == "{" || pair[0].text == ",") && is_head(&pair[1]) {
            heads.push(head(&pair[1]));
        }
    }
    heads
}

/// The index just past the item starting at `start`: its `;`, or its closing `}`.
fn end_of_item(toks: &[Token], start: usize) -> usize {
    let mut depth = 0i32;
    for (k, tok) in toks.iter().enumerate().skip(start) {
        match tok.text.as_str() {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" => depth -= 1,
            "}" if depth == 1 => return k + 1,
            "}" => depth -= 1,
            ";" if depth == 0 => return k + 1,
            _ => {}
        }
    }
    toks.len()
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

struct Token {
    text: String,
    line: usize,
}

/// Identifiers, `::`, and single punctuation characters, each with its 1-based line.
fn tokens(code: &str) -> Vec<Token> {
    let chars: Vec<char> = code.chars().collect();
    let (mut out, mut line, mut i) = (Vec::new(), 1, 0);
    while i < chars.len() {
        let start = i;
        i += 1;
        match chars[start] {
            '\n' => line += 1,
            c if c.is_whitespace() => continue,
            c if is_word(c) => i += chars[i..].iter().take_while(|&&c| is_word(c)).count(),
            ':' if chars.get(i) == Some(&':') => i += 1,
            _ => {}
        }
        if chars[start] != '\n' {
            let text = chars[start..i].iter().collect();
            out.push(Token { text, line });
        }
    }
    out
}

/// `source` with comments and string and char literals replaced by spaces (newlines kept).
fn blank_comments_and_literals(source: &str) -> String {
    let c: Vec<char> = source.chars().collect();
    let at = |k: usize| c.get(k).copied().unwrap_or('\0');
    let find = |from: usize, ch: char| (from..c.len()).find(|&k| c[k] == ch).unwrap_or(c.len());
    let blank = |&ch: &char| if ch == '\n' { '\n' } else { ' ' };
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < c.len() {
        let end = match (c[i], at(i + 1)) {
            ('/', '/') => find(i, '\n'),
            ('/', '*') => {
                let (mut k, mut depth) = (i + 2, 1);
                while k < c.len() && depth > 0 {
                    match (c[k], at(k + 1)) {
                        ('/', '*') => (depth, k) = (depth + 1, k + 2),
                        ('*', '/') => (depth, k) = (depth - 1, k + 2),
                        _ => k += 1,
                    }
                }
                k
            }
            ('"', _) => {
                let mut k = i + 1;
                while k < c.len() && c[k] != '"' {
                    k += if c[k] == '\\' { 2 } else { 1 };
                }
                k + 1
            }
            // A raw string r"…" / r#"…"# (also after b or c); an identifier ending in r is not.
            ('r', '"' | '#')
                if !is_word(at(i.wrapping_sub(1))) || matches!(at(i - 1), 'b' | 'c') =>
            {
                let hashes = c[i + 1..].iter().take_while(|&&ch| ch == '#').count();
                let closes = |k: usize| {
                    c[k] == '"' && c[k + 1..].iter().take_while(|&&h| h == '#').count() >= hashes
                };
                match at(i + 1 + hashes) {
                    '"' => (i + 2 + hashes..c.len())
                        .find(|&k| closes(k))
                        .map_or(c.len(), |k| k + 1 + hashes),
                    _ => i + 1, // a raw identifier such as r#type: blank only the r
                }
            }
            ('\'', '\\') => find(i + 3, '\'') + 1,
            ('\'', _) if at(i + 2) == '\'' => i + 3,
            (ch, _) => {
                out.push(ch);
                i += 1;
                continue;
            }
        };
        let end = end.min(c.len());
        out.extend(c[i..end].iter().map(blank));
        i = end;
    }
    out
}

/// Every `.rs` file under `dir`, as paths relative to `root` with `/` separators.
fn rust_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("read src/ entry").path();
        if path.is_dir() {
            rust_files(root, &path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let rel = path.strip_prefix(root).expect("under src/");
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

#[test]
fn the_crate_imports_only_downwards() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &src, &mut files);
    files.sort();
    let read = |rel: &String| fs::read_to_string(src.join(rel)).expect("read source");
    let problems: Vec<String> = files
        .iter()
        .flat_map(|rel| check_file(rel, &read(rel)))
        .collect();
    assert!(
        problems.is_empty(),
        "{} layering problems (a layer may import only the layers below it; rules: LAYERS in tests/layering.rs):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

mod the_checker {
    use super::*;

    /// `line:module` for each import `source` makes when it is the file `rel` under `src/`.
    fn found(rel: &str, source: &str) -> Vec<String> {
        let found = imports(&module_path(rel), source).into_iter();
        found
            .map(|(line, module)| format!("{line}:{module}"))
            .collect()
    }

    /// The one problem `check_file` finds.
    fn only_problem(rel: &str, source: &str) -> String {
        let problems = check_file(rel, source);
        assert_eq!(problems.len(), 1, "{problems:?}");
        problems[0].clone()
    }

    #[test]
    fn catches_an_upward_import_and_passes_downward_ones() {
        let source = "use crate::protocol::Frame;\nuse crate::sched::Scheduler;\n";
        let want = "src/fleet/backend.rs:2: layer fleet imports layer sched (sched is above fleet) via crate::sched";
        assert_eq!(only_problem("fleet/backend.rs", source), want);
        let downward = "use crate::api::Ctx;\nuse crate::fleet::Fleet;";
        assert_eq!(check_file("edge/origin.rs", downward), [""; 0]);
    }

    #[test]
    fn catches_paths_in_code_and_re_exports_with_their_lines() {
        let source = "pub(crate) use crate::api::Ctx;\n\nfn f() {\n    crate::edge::go();\n}\n";
        let problems = check_file("sched/mod.rs", source);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("src/sched/mod.rs:1: layer sched imports layer api (api is")
        );
        assert!(problems[1].starts_with("src/sched/mod.rs:4: layer sched imports layer edge"));
    }

    #[test]
    fn comments_and_literals_are_not_imports() {
        let source = r####"//! see crate::api
/// Also crate::api::Ctx, and /* crate::edge */ in a doc comment.
/* outer /* nested crate::api */ still crate::api */
fn f() -> (&'static str, char, &'static str) {
    let quote = '"';
    let brace = '{';
    ("crate::api::x", quote, r#"crate::api "quoted""#)
}
use crate::protocol::Frame;
"####;
        assert_eq!(found("fleet/x.rs", source), ["9:protocol"]);
    }

    #[test]
    fn super_from_mod_rs_is_the_crate_root_and_from_a_leaf_is_its_folder() {
        assert_eq!(found("sched/dispatch.rs", "use super::Stage;"), ["1:sched"]);
        assert_eq!(found("sched/mod.rs", "use super::api::Ctx;"), ["1:api"]);
        assert_eq!(
            found("sched/dispatch.rs", "use super::super::api::X;"),
            ["1:api"]
        );
        let inline_mod = "mod inner {\n    use super::Stage;\n}\nuse super::*;\n";
        assert_eq!(found("sched/mod.rs", inline_mod), ["2:sched", "4:*"]);
        let problem = only_problem("sched/mod.rs", inline_mod);
        assert!(problem.contains(":4: layer sched imports the wiring via crate::*"));
    }

    #[test]
    fn grouped_uses_name_each_module_on_its_own_line() {
        let source = "use crate::{\n    protocol::{Frame, jobs},\n    sessions::Hub,\n    self,\n    fleet,\n};";
        assert_eq!(
            found("sched/x.rs", source),
            ["2:protocol", "3:sessions", "5:fleet"]
        );
        let want = "src/files/x.rs:3: layer files imports layer sessions (sessions is beside files) via crate::sessions";
        assert_eq!(only_problem("files/x.rs", source), want);
    }

    #[test]
    fn cfg_test_items_are_exempt() {
        let source = "#[cfg(test)]\n#[allow(unused)]\nmod tests {\n    use crate::api::Ctx;\n}\n\
                      #[cfg(test)]\nuse crate::edge::x;\nuse crate::api::Ctx;\n";
        assert_eq!(found("sched/x.rs", source), ["8:api"]);
        let test_only_file = "#![cfg(test)]\nuse crate::api::Ctx;";
        assert_eq!(found("sched/x.rs", test_only_file), [""; 0]);
    }

    #[test]
    fn unknown_folders_unknown_targets_and_the_wiring_are_reported() {
        let want = "src/gate/routes.rs is in no layer (add its folder to LAYERS, or move it)";
        assert_eq!(only_problem("gate/routes.rs", "use crate::api::x;"), want);
        let want = "src/api/router.rs:1: layer api imports crate::gate, which is in no layer";
        assert_eq!(
            only_problem("api/router.rs", "use crate::gate::Gate;"),
            want
        );
        let demo = only_problem("api/router.rs", "use crate::demo::run;");
        assert!(
            demo.contains("imports the wiring via crate::demo"),
            "{demo}"
        );
        assert_eq!(check_file("lib.rs", "use crate::edge::x;"), [""; 0]);
        let fleet = only_problem("loadtest/client.rs", "use crate::fleet::nvml::Gpu;");
        assert!(fleet.contains("(fleet is above loadtest)"), "{fleet}");
    }

    #[test]
    fn the_layer_table_names_each_module_once() {
        let modules = LAYERS.iter().flat_map(|l| l.modules.iter());
        let mut names: Vec<&str> = modules.chain(WIRING.iter()).copied().collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        let why = "a module is in two layers, or in a layer and the wiring";
        assert_eq!(names.len(), count, "{why}");
    }
}
