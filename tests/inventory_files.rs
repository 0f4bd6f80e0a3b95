//! Every inventory shipped in `inventories/` is valid.

#[test]
fn shipped_inventories_all_validate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("inventories");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".yml") || name.contains(".secrets.") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        if let Err(e) = pgherd::inventory::parse(&text, &name) {
            panic!("{name} does not validate: {e}");
        }
        n += 1;
    }
    assert!(n >= 2, "expected the example and vagrant inventories");
}
