//! `#[ktest]`: registers a function as an in-kernel test.
//!
//! The function stays as written; next to it the macro emits a `KTest`
//! record in the `.ktests` linker section, named by the function's module path
//! (`mm::frame::tests::alloc_free`). The kernel's runner iterates the section.
//! The records exist only in kernel builds (`target_os = "none"`), so crates
//! that also build for the host are unaffected.

use proc_macro::{Delimiter, TokenStream, TokenTree};

/// Marks `fn name() { ... }` as an in-kernel test.
#[proc_macro_attribute]
pub fn ktest(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return compile_error("#[ktest] takes no arguments");
    }
    let mut tokens = item.clone().into_iter();
    let mut name = None;
    while let Some(tt) = tokens.next() {
        if let TokenTree::Ident(id) = &tt
            && id.to_string() == "fn"
        {
            if let Some(TokenTree::Ident(n)) = tokens.next() {
                name = Some(n.to_string());
            }
            break;
        }
    }
    let Some(name) = name else {
        return compile_error("#[ktest] goes on a function");
    };
    // A test function takes no arguments: check the parameter group is empty.
    let params_empty = item.clone().into_iter().any(
        |tt| matches!(&tt, TokenTree::Group(g) if g.delimiter() == Delimiter::Parenthesis && g.stream().is_empty()),
    );
    if !params_empty {
        return compile_error("a #[ktest] function takes no arguments");
    }
    let registration = format!(
        r#"
        #[cfg(target_os = "none")]
        const _: () = {{
            #[used]
            #[unsafe(link_section = ".ktests")]
            static KTEST: ::ktest::KTest = ::ktest::KTest {{
                name: concat!(module_path!(), "::", "{name}"),
                func: {name},
                file: file!(),
                line: line!(),
            }};
        }};
        "#
    );
    let mut out = TokenStream::new();
    out.extend("#[cfg_attr(not(target_os = \"none\"), allow(dead_code))]".parse::<TokenStream>().unwrap());
    out.extend(item);
    out.extend(registration.parse::<TokenStream>().unwrap());
    out
}

fn compile_error(msg: &str) -> TokenStream {
    format!("compile_error!({msg:?});").parse().unwrap()
}
