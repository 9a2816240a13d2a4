//! Assembly entry stubs for all 256 vectors.
//!
//! Each stub makes the stack look the same (a dummy error code where the CPU
//! pushes none, then the vector number) and jumps to a common path that saves
//! the general registers as a [`TrapFrame`](super::TrapFrame) and calls
//! [`trap_dispatch`](super::trap_dispatch).
//!
//! GS: a trap from ring 3 arrives with the user's GS base, so the common path
//! executes `swapgs` when the saved CS has RPL 3. NMI, #DF and #MC can land in
//! the few kernel instructions before a `swapgs` has run, so their stubs use
//! the "paranoid" path, which asks the MSR itself whether GS is the kernel's.

/// Vectors for which the CPU pushes an error code.
const fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
}

/// Vectors that take the paranoid GS path.
const fn is_paranoid(v: u8) -> bool {
    matches!(v, 2 | 8 | 18)
}

macro_rules! stubs {
    ($($v:literal)*) => {
        core::arch::global_asm!(
            $(
                concat!(".global trap_stub_", $v),
                ".p2align 4",
                concat!("trap_stub_", $v, ":"),
                concat!(".if ", stringify!($v), " == 8 || ", stringify!($v), " == 10 || ", stringify!($v), " == 11 || ",
                        stringify!($v), " == 12 || ", stringify!($v), " == 13 || ", stringify!($v), " == 14 || ",
                        stringify!($v), " == 17 || ", stringify!($v), " == 21 || ", stringify!($v), " == 29 || ",
                        stringify!($v), " == 30"),
                ".else",
                "    push 0",
                ".endif",
                concat!("    push ", $v),
                concat!(".if ", stringify!($v), " == 2 || ", stringify!($v), " == 8 || ", stringify!($v), " == 18"),
                "    jmp trap_paranoid",
                ".else",
                "    jmp trap_common",
                ".endif",
            )*
            ".section .rodata",
            ".p2align 3",
            ".global trap_stub_table",
            "trap_stub_table:",
            $( concat!("    .quad trap_stub_", $v), )*
            ".text",
        );
    };
}

stubs!(
    0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31
    32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63
    64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95
    96 97 98 99 100 101 102 103 104 105 106 107 108 109 110 111 112 113 114 115 116 117 118 119 120 121 122 123 124 125 126 127
    128 129 130 131 132 133 134 135 136 137 138 139 140 141 142 143 144 145 146 147 148 149 150 151 152 153 154 155 156 157 158 159
    160 161 162 163 164 165 166 167 168 169 170 171 172 173 174 175 176 177 178 179 180 181 182 183 184 185 186 187 188 189 190 191
    192 193 194 195 196 197 198 199 200 201 202 203 204 205 206 207 208 209 210 211 212 213 214 215 216 217 218 219 220 221 222 223
    224 225 226 227 228 229 230 231 232 233 234 235 236 237 238 239 240 241 242 243 244 245 246 247 248 249 250 251 252 253 254 255
);

// Keep the Rust-side predicates in sync with the assembly conditions above.
const _: () = assert!(has_error_code(14) && !has_error_code(3) && is_paranoid(2) && !is_paranoid(14));

core::arch::global_asm!(
    ".macro PUSH_GPRS",
    super::frame::push_gprs!(),
    ".endm",
    ".macro POP_GPRS",
    super::frame::pop_gprs!(),
    ".endm",
    r#"
.p2align 4
.global trap_common
trap_common:
    // [rsp] vector, [rsp+8] error code, [rsp+16] rip, [rsp+24] cs
    test qword ptr [rsp + 24], 3
    jz 1f
    swapgs
1:
    PUSH_GPRS
    cld
    mov rdi, rsp
    call trap_dispatch
.global trap_return
trap_return:
    POP_GPRS
    test qword ptr [rsp + 24], 3
    jz 2f
    swapgs
2:
    add rsp, 16
    iretq

.p2align 4
.global trap_paranoid
trap_paranoid:
    PUSH_GPRS
    cld
    // A kernel GS base is a higher-half address: the sign bit of its top half.
    xor r12d, r12d
    mov ecx, 0xC0000101
    rdmsr
    test edx, edx
    js 3f
    swapgs
    mov r12d, 1
3:
    mov rdi, rsp
    call trap_dispatch
    test r12d, r12d
    jz 4f
    swapgs
4:
    POP_GPRS
    add rsp, 16
    iretq
"#
);

unsafe extern "C" {
    /// Addresses of the 256 stubs, in vector order.
    pub static trap_stub_table: [u64; 256];
}
