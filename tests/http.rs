//! Images in a repository on an HTTP server (Debian's nginx with WebDAV PUT
//! and JSON autoindex, on loopback): only chunks the server lacks are sent.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// nginx serving a directory on a free loopback port; stopped by PID on drop.
struct Nginx {
    child: Child,
    url: String,
    log: PathBuf,
}

/// A private CA and a certificate for 127.0.0.1 signed by it, made with
/// openssl: (CA certificate, server certificate, server key).
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    fs::create_dir_all(dir).unwrap();
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (crt, key, csr) = (
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("server.csr"),
    );
    let ext = dir.join("ext.cnf");
    fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    sh(&format!(
        "cd {d} && openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bmr-test-ca -keyout {ck} -out {ca} 2>/dev/null \
         && openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout {k} -out {csr} 2>/dev/null \
         && openssl x509 -req -in {csr} -CA {ca} -CAkey {ck} -CAcreateserial -days 2 -extfile {ext} -out {crt} 2>/dev/null",
        d = dir.display(),
        ck = ca_key.display(),
        ca = ca.display(),
        k = key.display(),
        csr = csr.display(),
        ext = ext.display(),
        crt = crt.display()
    ));
    (ca, crt, key)
}

impl Nginx {
    fn start(dir: &Path) -> Nginx {
        Nginx::start_with(dir, None)
    }

    /// HTTPS with the given certificate and key.
    fn start_tls(dir: &Path, cert: &Path, key: &Path) -> Nginx {
        Nginx::start_with(dir, Some((cert, key)))
    }

    fn start_with(dir: &Path, tls: Option<(&Path, &Path)>) -> Nginx {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let www = dir.join("www");
        fs::create_dir_all(www.join("repo")).unwrap();
        fs::create_dir_all(dir.join("logs")).unwrap();
        let conf = dir.join("nginx.conf");
        let log = dir.join("logs/access.log");
        fs::write(
            &conf,
            format!(
                "worker_processes 1; pid {d}/nginx.pid; error_log {d}/logs/error.log;
                 events {{ worker_connections 64; }}
                 http {{
                   access_log {log}; client_body_temp_path {d}/body; client_max_body_size 0;
                   server {{
                     listen 127.0.0.1:{port}{ssl}; root {www}; {certs}
                     location / {{ dav_methods PUT; create_full_put_path on; dav_access user:rw; autoindex on; autoindex_format json; }}
                   }}
                 }}",
                d = dir.display(),
                log = log.display(),
                www = www.display(),
                ssl = if tls.is_some() { " ssl" } else { "" },
                certs = tls
                    .map(|(c, k)| format!(
                        "ssl_certificate {}; ssl_certificate_key {};",
                        c.display(),
                        k.display()
                    ))
                    .unwrap_or_default()
            ),
        )
        .unwrap();
        let child = Command::new("nginx")
            .args(["-e", "stderr", "-g", "daemon off; user root;", "-p"])
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx {
            child,
            url: format!(
                "{}://127.0.0.1:{port}/repo",
                if tls.is_some() { "https" } else { "http" }
            ),
            log,
        }
    }

    /// PUT requests for chunks so far.
    fn chunk_puts(&self) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"PUT /repo/chunks/"))
            .count()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master stops its workers too; SIGKILL would orphan them.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

#[test]
fn second_backup_sends_only_new_chunks_and_restores_over_http() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let server = Nginx::start(&tmp.path().join("nginx"));
    let vol = tmp.path().join("vol.img");
    fs::File::create(&vol).unwrap().set_len(64 << 20).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "web"])
        .arg(&vol));
    let fill = tmp.path().join("fill");
    fs::create_dir_all(&fill).unwrap();
    run(Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&vol)
        .arg(&fill));
    {
        let _m = Mounted { dir: fill.clone() };
        sh(&format!(
            "head -c 12M /dev/urandom > {}/data",
            fill.display()
        ));
    }
    let repo = format!("{}/", server.url);
    let out = stdout(
        bmr()
            .args(["image", "create", "--name", "one", "--device"])
            .arg(&vol)
            .args(["--to", &repo]),
    );
    let first = server.chunk_puts();
    assert!(
        first >= 12,
        "the first image sends its chunks: {first}\n{out}"
    );

    // A copy of the same volume with 2 MiB changed: only those chunks travel.
    let copy = tmp.path().join("copy.img");
    fs::copy(&vol, &copy).unwrap();
    run(Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&copy)
        .arg(&fill));
    {
        let _m = Mounted { dir: fill.clone() };
        sh(&format!(
            "head -c 2M /dev/urandom > {}/more",
            fill.display()
        ));
    }
    let out = stdout(
        bmr()
            .args(["image", "create", "--name", "two", "--device"])
            .arg(&copy)
            .args(["--to", &repo]),
    );
    let second = server.chunk_puts() - first;
    assert!(
        (1..=6).contains(&second),
        "only the changed chunks are sent, counted on the server: {second}\n{out}"
    );
    assert!(
        out.contains(&format!("uploaded {second} new chunks")),
        "{out}"
    );

    let image = format!("{}/images/two.bmri", server.url);
    run(bmr().args(["image", "verify", &image]));
    let target = tmp.path().join("target.img");
    fs::File::create(&target)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    run(bmr()
        .args(["image", "restore", "--from", &image, "--device"])
        .arg(&target));
    sh(&format!("e2fsck -fn {} >/dev/null", target.display()));
    let back = tmp.path().join("back");
    fs::create_dir_all(&back).unwrap();
    run(Command::new("mount")
        .args(["-o", "ro,loop"])
        .arg(&target)
        .arg(&back));
    let _m = Mounted { dir: back.clone() };
    run(Command::new("mount")
        .args(["-o", "ro,loop"])
        .arg(&copy)
        .arg(&fill));
    let _c = Mounted { dir: fill.clone() };
    for f in ["data", "more"] {
        assert!(
            fs::read(back.join(f)).unwrap() == fs::read(fill.join(f)).unwrap(),
            "{f} restored from HTTP"
        );
    }

    // A server that is not there: a clear error, naming it without credentials.
    let out = bmr()
        .args([
            "image",
            "info",
            "http://bob:s3cret@127.0.0.1:9/repo/images/x.bmri",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot reach") && !err.contains("s3cret"),
        "{err}"
    );
}

#[test]
fn https_is_verified_against_the_trusted_cas() {
    require_root();
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(&tmp.path().join("tls"));
    let server = Nginx::start_tls(&tmp.path().join("nginx"), &cert, &key);
    let vol = tmp.path().join("vol.img");
    fs::File::create(&vol).unwrap().set_len(32 << 20).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "tls"])
        .arg(&vol));
    let repo = format!("{}/", server.url);
    assert!(repo.starts_with("https://"));

    // The system's CAs do not know this server: refused, nothing sent.
    let out = bmr()
        .args(["image", "create", "--name", "one", "--device"])
        .arg(&vol)
        .args(["--to", &repo])
        .env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unknown issuer must be refused");
    assert!(
        err.contains("UnknownIssuer") && err.contains("SSL_CERT_FILE"),
        "the cause and the way out are named: {err}"
    );
    assert_eq!(
        server.chunk_puts(),
        0,
        "nothing sent before TLS is verified"
    );

    // Trusting the CA that signed it (SSL_CERT_FILE, as OpenSSL tools do): the image goes up and verifies.
    let out = stdout(
        bmr()
            .args(["image", "create", "--name", "one", "--device"])
            .arg(&vol)
            .args(["--to", &repo])
            .env("SSL_CERT_FILE", &ca),
    );
    assert!(server.chunk_puts() >= 1, "{out}");
    let image = format!("{}/images/one.bmri", server.url);
    run(bmr()
        .args(["image", "verify", &image])
        .env("SSL_CERT_FILE", &ca));
}
