//! A small assembler for classic BPF seccomp programs: jumps to labels, resolved (and checked to
//! fit the 8-bit offsets) at the end.

/// Let the call through.
pub const RET_ALLOW: u32 = 0x7fff_0000;
/// Refuse the call with EPERM.
pub const RET_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;

// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

/// A place in the program, bound with [`Asm::bind`].
#[derive(Debug, Clone, Copy)]
pub struct Label(usize);

/// A program under construction.
#[derive(Default)]
pub struct Asm {
    code: Vec<libc::sock_filter>,
    /// (instruction, where it jumps if true, where if false); None: the next instruction.
    jumps: Vec<(usize, Option<Label>, Option<Label>)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    /// A new, unbound label.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `label` to the next instruction.
    pub fn bind(&mut self, label: Label) {
        self.labels[label.0] = Some(self.code.len());
    }

    fn push(&mut self, code: u32, k: u32) {
        self.code.push(libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        });
    }

    fn load(&mut self, offset: u32) {
        self.push(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset);
    }

    /// Loads the architecture.
    pub fn load_arch(&mut self) {
        self.load(OFF_ARCH);
    }

    /// Loads the system call number.
    pub fn load_nr(&mut self) {
        self.load(OFF_NR);
    }

    /// Loads the low 32 bits of argument `i` (little-endian).
    pub fn load_arg_lo(&mut self, i: u32) {
        self.load(OFF_ARGS + 8 * i);
    }

    fn jump(&mut self, op: u32, k: u32, jt: Option<Label>, jf: Option<Label>) {
        self.jumps.push((self.code.len(), jt, jf));
        self.push(libc::BPF_JMP | op | libc::BPF_K, k);
    }

    /// Jumps to `jt` if the accumulator equals `k`, else to `jf`.
    pub fn jeq(&mut self, k: u32, jt: Option<Label>, jf: Option<Label>) {
        self.jump(libc::BPF_JEQ, k, jt, jf);
    }

    /// Jumps to `jt` if the accumulator has any bit of `k`, else to `jf`.
    pub fn jset(&mut self, k: u32, jt: Option<Label>, jf: Option<Label>) {
        self.jump(libc::BPF_JSET, k, jt, jf);
    }

    /// Returns `k` (an action).
    pub fn ret(&mut self, k: u32) {
        self.push(libc::BPF_RET | libc::BPF_K, k);
    }

    /// The program, with every jump resolved. Panics on an unbound label or a jump that is
    /// backwards or too far: both are bugs in the program's source, found by its tests.
    pub fn finish(mut self) -> Vec<libc::sock_filter> {
        for (at, jt, jf) in std::mem::take(&mut self.jumps) {
            let offset = |target: Option<Label>| -> u8 {
                let Some(label) = target else { return 0 };
                let to = self.labels[label.0].expect("every label is bound");
                u8::try_from(to.checked_sub(at + 1).expect("jumps go forward"))
                    .expect("a jump fits in 8 bits")
            };
            let (t, f) = (offset(jt), offset(jf));
            self.code[at].jt = t;
            self.code[at].jf = f;
        }
        self.code
    }
}
