//! STARTTLS with QEMU's x509 credentials, certificates generated per test with rcgen.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_nbd::proto::*;
use ferry_nbd::{Export, MemExport, ServerConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

const LIMIT: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;

/// Write `ca-cert.pem` into `dir` and return (server chain PEM, server key PEM).
fn make_pki(dir: &Path) -> (String, String) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "ferry test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    (leaf_cert.pem(), leaf_key.serialize_pem())
}

fn tls_config(dir: &Path, require_tls: bool) -> (Arc<MemExport>, Arc<ServerConfig>) {
    let (chain, key) = make_pki(dir);
    let acceptor = ferry_nbd::tls::acceptor_from_pem(chain.as_bytes(), key.as_bytes()).unwrap();
    let mem = Arc::new(MemExport::new(4 * MIB));
    let mut exports: HashMap<String, Arc<dyn Export>> = HashMap::new();
    exports.insert("disk".into(), mem.clone());
    (
        mem,
        Arc::new(ServerConfig {
            exports,
            tls: Some(acceptor),
            require_tls,
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_over_tls() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let (mem, cfg) = tls_config(dir.path(), true);
        let srv = start_server(cfg).await;
        let obj = format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.path().display()
        );
        let opts = format!(
            "driver=nbd,host=127.0.0.1,port={},export=disk,tls-creds=tls0",
            srv.port
        );

        let info = run_ok(
            "qemu-img",
            &[
                "info",
                "--output=json",
                "--object",
                &obj,
                "--image-opts",
                &opts,
            ],
        )
        .await;
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["virtual-size"], 4 * MIB as u64);

        let out = run_ok(
            "qemu-io",
            &[
                "--object",
                &obj,
                "--image-opts",
                &opts,
                "-c",
                "write -P 0x99 4k 1M",
                "-c",
                "read -P 0x99 4k 1M",
                "-c",
                "flush",
            ],
        )
        .await;
        assert!(!out.contains("failed"), "{out}");
        assert!(mem.contents()[4096..4096 + MIB].iter().all(|&b| b == 0x99));

        // Hostname check: "localhost" is also in the certificate.
        let opts_host = format!(
            "driver=nbd,host=localhost,port={},export=disk,tls-creds=tls0",
            srv.port
        );
        run_ok(
            "qemu-img",
            &["info", "--object", &obj, "--image-opts", &opts_host],
        )
        .await;

        // Plaintext is refused when TLS is required.
        let plain = format!("nbd://127.0.0.1:{}/disk", srv.port);
        let out = run("qemu-img", &["info", &plain]).await;
        assert!(!out.status.success(), "plaintext access must fail");

        // A client trusting another CA refuses our certificate.
        let other = tempfile::tempdir().unwrap();
        make_pki(other.path());
        let obj_other = format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            other.path().display()
        );
        let out = run(
            "qemu-img",
            &["info", "--object", &obj_other, "--image-opts", &opts],
        )
        .await;
        assert!(!out.status.success(), "untrusted certificate must fail");

        // And the server still serves a good client afterwards.
        run_ok(
            "qemu-img",
            &["info", "--object", &obj, "--image-opts", &opts],
        )
        .await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn tls_required_refuses_plaintext_options() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let (_mem, cfg) = tls_config(dir.path(), true);
        let srv = start_server(cfg).await;
        let mut s = connect(srv.port).await;
        greet(&mut s).await;
        for opt in [OPT_GO, OPT_INFO, OPT_LIST, OPT_STRUCTURED_REPLY, 0x777] {
            let data = if opt == OPT_GO || opt == OPT_INFO {
                go_data("disk", &[])
            } else {
                vec![]
            };
            send_opt(&mut s, opt, &data).await;
            let r = read_opt_reply(&mut s).await;
            assert_eq!((r.opt, r.kind), (opt, REP_ERR_TLS_REQD));
        }
        send_opt(&mut s, OPT_STARTTLS, b"x").await;
        assert_eq!(read_opt_reply(&mut s).await.kind, REP_ERR_INVALID);
        // EXPORT_NAME has no error reply: the server hangs up.
        send_opt(&mut s, OPT_EXPORT_NAME, b"disk").await;
        assert!(closed_by_server(&mut s).await);

        // Optional TLS: plaintext works too.
        let dir2 = tempfile::tempdir().unwrap();
        let (_mem, cfg) = tls_config(dir2.path(), false);
        let srv = start_server(cfg).await;
        let (_s, size, _) = connect_go(srv.port, "disk").await;
        assert_eq!(size, 4 * MIB as u64);
    })
    .await
    .expect("test timed out");
}
