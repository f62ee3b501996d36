//! The cluster spec as a user meets it: templates that parse, `init`, and a corpus of broken
//! specs (tests/specs/*.yaml), each refused by `up` with the file, line and column and the fix —
//! and with nothing started.

use std::path::Path;

use crate::common::Cluster;

#[test]
fn every_broken_spec_is_refused_with_its_location_and_the_fix() {
    let c = Cluster::new("specs");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/specs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} starts with '# expect: '", path.display()));
        let r = c.starling_raw(&["up", "-f", path.to_str().unwrap()]);
        r.fails();
        assert!(
            r.stderr.starts_with(&format!("error: {}", path.display())),
            "{}: the error names the file: {}",
            path.display(),
            r.stderr
        );
        assert!(
            r.stderr.contains(expect),
            "{}: expected {expect:?} in {}",
            path.display(),
            r.stderr
        );
        checked += 1;
    }
    assert!(checked >= 20, "the corpus has {checked} specs");
    assert!(c.processes().is_empty(), "a refused spec starts nothing");
}

#[test]
fn every_template_is_valid_and_init_writes_it() {
    for (name, text) in starling::spec::TEMPLATES {
        let spec =
            starling::spec::parse(name, text).unwrap_or_else(|e| panic!("template {name}: {e}"));
        assert_eq!(
            spec.ec2.is_some(),
            name.starts_with("ec2") || *name == "localstack",
            "{name}"
        );
    }
    let c = Cluster::new("init");
    let out = c.home_path().join("cluster.yaml");
    let r = c.starling_raw(&["init", "--template", "ec2", "-o", out.to_str().unwrap()]);
    assert!(
        r.ok().stdout.contains("from the ec2 template"),
        "{}",
        r.stdout
    );
    let spec = starling::spec::load(&out).unwrap();
    assert_eq!(spec.ec2.unwrap().nodes, 4);
    let again = c.starling_raw(&["init", "--template", "ec2", "-o", out.to_str().unwrap()]);
    assert!(
        again.fails().stderr.contains("exists; pass --force"),
        "{}",
        again.stderr
    );
    let bad = c.starling_raw(&["init", "--template", "gce", "-o", out.to_str().unwrap()]);
    assert!(
        bad.fails()
            .stderr
            .contains("there is no template 'gce'; the templates are local, ec2"),
        "{}",
        bad.stderr
    );
    // An EC2 spec is understood, and `up` checks what it can on this machine before it talks
    // to EC2 (this suite sends nothing beyond loopback): here, that the SSH key exists.
    let text = std::fs::read_to_string(&out).unwrap();
    let missing = c.home_path().join("no-such-key");
    std::fs::write(
        &out,
        text.replace("~/.ssh/id_ed25519", missing.to_str().unwrap()),
    )
    .unwrap();
    let up = c.starling_raw(&["up", "-f", out.to_str().unwrap()]);
    assert!(
        up.fails().stderr.contains(&format!(
            "the SSH key {} (ssh.key_file) does not exist; create one with `ssh-keygen -t ed25519 -f",
            missing.display()
        )),
        "{}",
        up.stderr
    );
}
