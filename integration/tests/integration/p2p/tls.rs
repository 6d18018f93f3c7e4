//! Mutual TLS between peers: blocks cross it, and a client without a certificate from the
//! configured CA gets nothing, not even `/health`.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use super::{ensure_all_right, start_together, with_cluster};
use crate::fixture::{privileged, Fixture};
use crate::process;

/// A CA, a certificate for every address of the test network (server and client use), and a
/// client certificate from another CA; written with the openssl CLI. Returns the directory.
pub(super) fn certificates(fixture: &Fixture) -> Result<PathBuf> {
    let dir = fixture.mkdir("tls")?;
    let openssl = |args: &[&str]| -> Result<String> {
        let mut command = Command::new("openssl");
        command.current_dir(&dir).args(args);
        process::run(&mut command, Duration::from_secs(30))
    };
    let sans: Vec<String> = (10..40).map(|i| format!("IP:10.77.0.{i}")).collect();
    fs::write(
        dir.join("node.ext"),
        format!(
            "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
            sans.join(",")
        ),
    )?;
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "rogue-ca"] {
        let (subject, keyout, out) = (
            format!("/CN=shoal test {ca}"),
            format!("{ca}.key"),
            format!("{ca}.pem"),
        );
        let mut args = vec!["req", "-x509"];
        args.extend(key);
        args.extend([
            "-keyout", &keyout, "-out", &out, "-days", "2", "-subj", &subject,
        ]);
        openssl(&args)?;
    }
    for (name, ca) in [("node", "ca"), ("rogue", "rogue-ca")] {
        let mut args = vec!["req"];
        args.extend(key);
        let (keyout, csr) = (format!("{name}.key"), format!("{name}.csr"));
        args.extend(["-keyout", &keyout, "-out", &csr, "-subj", "/CN=shoal node"]);
        openssl(&args)?;
        let (ca_pem, ca_key, pem) = (
            format!("{ca}.pem"),
            format!("{ca}.key"),
            format!("{name}.pem"),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            "node.ext",
        ])?;
    }
    Ok(dir)
}

#[test]
fn with_mutual_tls_a_client_without_a_valid_certificate_gets_nothing() {
    privileged!();
    Fixture::run(|fixture| {
        let tls = certificates(fixture)?;
        with_cluster(fixture, |cluster, published| {
            let reference = format!("{}/{}", cluster.registry_host()?, published.path);
            let settings = format!(
                "latency_budget_ms = 3000\ntls = {{ ca = \"{0}/ca.pem\", cert = \"{0}/node.pem\", \
                 key = \"{0}/node.key\" }}",
                tls.display()
            );
            let nodes = cluster.add_peers("t", &[settings.as_str(); 2])?;
            ensure_all_right(
                &start_together(cluster, &nodes[..1], &reference, "prime"),
                &published.blob_sha256,
            )?;
            let started = start_together(cluster, &nodes[1..], &reference, "second");
            ensure_all_right(&started, &published.blob_sha256)?;
            let status = cluster.nodes[nodes[1]].status(&cluster.network)?;
            anyhow::ensure!(
                status["bytes_from_peers"].as_u64() > Some(0),
                "no bytes crossed the mutual TLS link: {status:#}"
            );

            // From the second node's namespace, curl the first node's listener.
            let url = format!("https://{}/health", cluster.nodes[nodes[0]].peer_name());
            let curl = |extra: &[String]| -> Result<String> {
                let mut command = cluster.network.command("t1", "curl")?;
                command
                    .args(["-sS", "--http2", "--max-time", "5", "--cacert"])
                    .arg(tls.join("ca.pem"))
                    .args(extra)
                    .arg(&url);
                process::run(&mut command, Duration::from_secs(20))
            };
            let cert = |name: &str| {
                vec![
                    "--cert".to_owned(),
                    tls.join(format!("{name}.pem")).display().to_string(),
                    "--key".to_owned(),
                    tls.join(format!("{name}.key")).display().to_string(),
                ]
            };
            let answered = curl(&cert("node"))?;
            anyhow::ensure!(
                answered.contains("\"node\""),
                "with a valid certificate: {answered}"
            );
            for (what, extra) in [("no certificate", vec![]), ("another CA's", cert("rogue"))] {
                match curl(&extra) {
                    Ok(out) => anyhow::bail!("a client with {what} got an answer: {out}"),
                    Err(err) => eprintln!("p2p tls: a client with {what} was refused: {err:#}"),
                }
            }
            // Plain HTTP to the TLS listener gets nothing either.
            let mut plain = cluster.network.command("t1", "curl")?;
            plain.args(["-sS", "--http2-prior-knowledge", "--max-time", "5"]);
            plain.arg(url.replace("https://", "http://"));
            anyhow::ensure!(
                process::run(&mut plain, Duration::from_secs(20)).is_err(),
                "plain HTTP got an answer from the TLS listener"
            );
            Ok(())
        })
    });
}
