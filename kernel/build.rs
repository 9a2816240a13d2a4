//! Links the kernel with its own linker script (upper-half, page-aligned
//! sections: see linker.ld).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    // Only the bare-metal build uses the script; `cargo check` on the host
    // does not link a binary anyway.
    if std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-none") {
        println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    }
    println!("cargo:rerun-if-changed=linker.ld");
}
