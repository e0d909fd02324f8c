// SPDX-License-Identifier: GPL-2.0-or-later
//! The agent's C header `krr_agent_abi.h`, generated from the layout tables
//! ([`c_header`]).

use super::*;

/// Writes `text` as a C comment in kernel style: one line if it fits in 80
/// columns (a tab counts 8), else a block comment wrapped at 80 columns.
fn c_comment(out: &mut String, indent: &str, text: &str) {
    const WIDTH: usize = 80;
    let indent_cols = indent
        .chars()
        .map(|c| if c == '\t' { 8 } else { 1 })
        .sum::<usize>();
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() {
        return;
    }
    let one_line = words.join(" ");
    if indent_cols + one_line.len() + 6 <= WIDTH {
        out.push_str(&format!("{indent}/* {one_line} */\n"));
        return;
    }
    out.push_str(&format!("{indent}/*\n"));
    let mut line = String::new();
    for word in words {
        if !line.is_empty() && indent_cols + 3 + line.len() + 1 + word.len() > WIDTH {
            out.push_str(&format!("{indent} * {line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&format!("{indent} * {line}\n{indent} */\n"));
}

/// The agent's C header `krr_agent_abi.h`, generated from this module.
/// Usable in the kernel (`linux/types.h`) and in user space (`stdint.h`).
pub fn c_header() -> String {
    let mut out = String::new();
    out.push_str("/* SPDX-License-Identifier: GPL-2.0-or-later */\n");
    out.push_str("/*\n * KRR guest-agent ABI: the shared-memory ring between the agent and the\n");
    out.push_str(" * engine. GENERATED from engine/src/record/abi.rs (krr_engine::record::abi::\n");
    out.push_str(" * c_header()); do not edit, regenerate. engine/tests/agent_abi.rs checks\n");
    out.push_str(" * that this copy and every size and offset agree with the Rust ABI.\n */\n");
    out.push_str("#ifndef _KRR_AGENT_ABI_H\n#define _KRR_AGENT_ABI_H\n\n");
    out.push_str(
        "#ifdef __KERNEL__\n#include <linux/types.h>\n#else\n#include <stdint.h>\n#endif\n\n",
    );
    for (name, value, suffix) in constants() {
        out.push_str(&format!("#define {name} 0x{value:x}{suffix}\n"));
    }
    for layout in layouts() {
        out.push('\n');
        c_comment(&mut out, "", layout.doc);
        out.push_str(&format!("struct {} {{\n", layout.c_name));
        for field in &layout.fields {
            c_comment(&mut out, "\t", field.doc);
            match field.array_len {
                Some(n) => out.push_str(&format!("\t{} {}[{}];\n", field.c_type, field.name, n)),
                None => out.push_str(&format!("\t{} {};\n", field.c_type, field.name)),
            }
        }
        out.push_str("};\n");
    }
    out.push_str("\n#endif /* _KRR_AGENT_ABI_H */\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lists_every_struct_and_constant() {
        let header = c_header();
        for layout in layouts() {
            assert!(header.contains(&format!("struct {} {{", layout.c_name)));
        }
        for (name, _, _) in constants() {
            assert!(header.contains(&format!("#define {name} ")), "{name}");
        }
        assert!(header.contains("uint64_t reserved2[15];"));
        for (n, line) in header.lines().enumerate() {
            let cols: usize = line.chars().map(|c| if c == '\t' { 8 } else { 1 }).sum();
            assert!(
                cols <= 80,
                "header line {} has {cols} columns: {line}",
                n + 1
            );
        }
    }
}
