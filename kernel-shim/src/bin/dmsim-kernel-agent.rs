//! The replay agent, `/init` of the shim's initramfs (see
//! `dmsim_kernel_shim::agent`). Run elsewhere than as PID 1 it refuses:
//! it mounts filesystems and powers the machine off. `engine …` runs the
//! userland engine instead (the agent starts it so, in the VM).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The userland engine, started by the agent in the VM (JobKind::Engine).
    if args.get(1).map(String::as_str) == Some("engine") {
        std::process::exit(dmsim_kernel_shim::agent::engine_main(&args[2..]));
    }
    if !dmsim_kernel_shim::agent::is_init() {
        eprintln!("dmsim-kernel-agent: this is the init of the kernel shim's VM; it only runs as PID 1");
        std::process::exit(2);
    }
    dmsim_kernel_shim::agent::init_main()
}
