//! The replay agent, `/init` of the shim's initramfs (see
//! `dmsim_kernel_shim::agent`). Run elsewhere than as PID 1 it refuses:
//! it mounts filesystems and powers the machine off.

fn main() {
    if !dmsim_kernel_shim::agent::is_init() {
        eprintln!("dmsim-kernel-agent: this is the init of the kernel shim's VM; it only runs as PID 1");
        std::process::exit(2);
    }
    dmsim_kernel_shim::agent::init_main()
}
