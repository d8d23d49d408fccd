//! New filesystems with the saved UUID and label, made by the real tools.

use std::process::Command;

use anyhow::{bail, Result};

use crate::manifest::Role;
use crate::plan::VolumePlan;

/// A filesystem to make: what it is and the identity it must carry.
pub struct NewFs<'a> {
    pub filesystem: &'a str,
    pub uuid: &'a str,
    pub label: &'a str,
    pub role: Role,
    pub size_bytes: u64,
}

impl<'a> From<&'a VolumePlan> for NewFs<'a> {
    fn from(v: &'a VolumePlan) -> NewFs<'a> {
        NewFs {
            filesystem: &v.filesystem,
            uuid: &v.uuid,
            label: &v.label,
            role: v.role,
            size_bytes: v.size_bytes,
        }
    }
}

fn tool(name: &str, package: &str) -> Result<Command> {
    if !crate::tool::exists(name) {
        bail!("{name} is not installed; install {package}");
    }
    Ok(Command::new(name))
}

/// The command that makes `v`'s filesystem on `device`, and a follow-up
/// where the tool cannot set everything at once.
pub fn commands(
    v: &NewFs<'_>,
    device: &str,
    sector: u32,
    start_sector: u64,
) -> Result<Vec<Command>> {
    let label = |c: &mut Command, flag: &str| {
        if !v.label.is_empty() {
            c.args([flag, v.label]);
        }
    };
    let mut cmds = Vec::new();
    match v.filesystem {
        fs @ ("ext2" | "ext3" | "ext4") => {
            let mut c = tool("mke2fs", "e2fsprogs")?;
            c.args(["-q", "-F", "-t", fs]);
            if !v.uuid.is_empty() {
                c.args(["-U", v.uuid]);
            }
            label(&mut c, "-L");
            cmds.push(c);
        }
        "vfat" => {
            let mut c = tool("mkfs.vfat", "dosfstools")?;
            if !v.uuid.is_empty() {
                c.args(["-i", &v.uuid.replace('-', "")]);
            }
            if sector > 512 {
                c.args(["-S", &sector.to_string()]);
            }
            // UEFI firmware expects FAT32 on an ESP large enough for it.
            if v.role == Role::Esp && v.size_bytes >= 64 << 20 {
                c.args(["-F", "32"]);
            }
            label(&mut c, "-n");
            cmds.push(c);
        }
        "ntfs" => {
            let mut c = tool("mkntfs", "ntfs-3g")?;
            c.args([
                "-Q",
                "-q",
                "-F",
                "-p",
                &start_sector.to_string(),
                "-H",
                "255",
                "-S",
                "63",
            ]);
            if sector > 512 {
                c.args(["-s", &sector.to_string()]);
            }
            label(&mut c, "-L");
            cmds.push(c);
            if !v.uuid.is_empty() {
                let mut s = tool("ntfslabel", "ntfs-3g")?;
                s.arg(format!("--new-serial={}", v.uuid));
                s.arg(device);
                s.arg(v.label);
                cmds.push(s);
            }
        }
        "swap" => {
            let mut c = tool("mkswap", "util-linux")?;
            if !v.uuid.is_empty() {
                c.args(["-U", v.uuid]);
            }
            label(&mut c, "-L");
            cmds.push(c);
        }
        "xfs" => {
            let mut c = tool("mkfs.xfs", "xfsprogs")?;
            c.arg("-f");
            if !v.uuid.is_empty() {
                c.args(["-m", &format!("uuid={}", v.uuid)]);
            }
            label(&mut c, "-L");
            cmds.push(c);
        }
        "btrfs" => {
            let mut c = tool("mkfs.btrfs", "btrfs-progs")?;
            c.arg("-f");
            if !v.uuid.is_empty() {
                c.args(["-U", v.uuid]);
            }
            label(&mut c, "-L");
            cmds.push(c);
        }
        other => bail!("bmr cannot create a {other} filesystem"),
    }
    // The device goes last for the mkfs tools (ntfslabel already has it).
    cmds[0].arg(device);
    Ok(cmds)
}

pub fn run(v: &NewFs<'_>, device: &str, sector: u32, start_sector: u64) -> Result<()> {
    for mut c in commands(v, device, sector, start_sector)? {
        crate::tool::run(&mut c)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nf<'a>(filesystem: &'a str, uuid: &'a str, label: &'a str) -> NewFs<'a> {
        NewFs {
            filesystem,
            uuid,
            label,
            role: Role::Data,
            size_bytes: 100 << 20,
        }
    }

    fn argv(c: &Command) -> Vec<String> {
        std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn uuid_and_label_reach_each_tool() {
        let c = commands(
            &nf("ext4", "22222222-0000-4000-8000-000000000002", "root"),
            "/dev/vdb1",
            512,
            2048,
        )
        .unwrap();
        assert_eq!(
            argv(&c[0]),
            [
                "mke2fs",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-U",
                "22222222-0000-4000-8000-000000000002",
                "-L",
                "root",
                "/dev/vdb1"
            ]
        );
        let c = commands(&nf("vfat", "0E5F-0001", "ESP"), "/dev/vdb1", 4096, 256).unwrap();
        assert_eq!(
            argv(&c[0]),
            [
                "mkfs.vfat",
                "-i",
                "0E5F0001",
                "-S",
                "4096",
                "-n",
                "ESP",
                "/dev/vdb1"
            ]
        );
        let c = commands(
            &nf("ntfs", "689F0D966C3312E5", "DATA"),
            "/dev/vdb4",
            512,
            395264,
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert!(argv(&c[0]).contains(&"395264".to_string()));
        assert_eq!(
            argv(&c[1]),
            [
                "ntfslabel",
                "--new-serial=689F0D966C3312E5",
                "/dev/vdb4",
                "DATA"
            ]
        );
        let c = commands(
            &nf("swap", "33333333-0000-4000-8000-000000000003", ""),
            "/dev/vdb3",
            512,
            1,
        )
        .unwrap();
        assert_eq!(
            argv(&c[0]),
            [
                "mkswap",
                "-U",
                "33333333-0000-4000-8000-000000000003",
                "/dev/vdb3"
            ]
        );
        let err = commands(&nf("zfs_member", "", ""), "/dev/vdb3", 512, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot create a zfs_member"), "{err}");
    }
}
