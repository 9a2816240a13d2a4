//! Links the kernel with its own linker script (upper-half, page-aligned
//! sections: see linker.ld) and checks that the user programs it embeds were
//! built (xtask builds them first and passes their path in PTLK_USER_ELF).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    if std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-none") {
        println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
        match std::env::var("PTLK_USER_ELF") {
            Ok(path) if std::path::Path::new(&path).is_file() => {
                println!("cargo:rerun-if-changed={path}");
            }
            _ => panic!(
                "PTLK_USER_ELF does not name the built user programs: build the kernel with \
                 `cargo xtask build` (or run/test), which builds user/ first"
            ),
        }
    }
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-env-changed=PTLK_USER_ELF");
}
