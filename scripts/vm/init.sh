#!/bin/sh
# /init of the strata test VM's initramfs (busybox; copied in by setup.sh).
# Kernel cmdline:  strata.cmd=<base64 of a shell command>  strata.rw=1
#   strata.cmdfw=1  the command is in fw_cfg opt/strata/cmd (too long for the cmdline)
#   strata.probe=1  no disk: print the markers and power off (accelerator probe)
# Mounts /dev/vda (ext4) at /newroot, runs the command there with chroot and
# prints STRATA-VM-BEGIN / STRATA-VM-END rc=N, or STRATA-VM-ERROR <reason>.
# Every wait is bounded; the VM always powers off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
stty -onlcr 2>/dev/null   # raw "\n" on the serial line, no "\r\n"

off() {
  cd /
  sync
  echo "STRATA-VM-DOWN"
  poweroff -f
  sleep 5
  reboot -f             # -no-reboot turns this into an exit as well
}
fail() {
  echo "STRATA-VM-ERROR $*"
  dmesg | tail -n 15 | sed 's/^/  dmesg: /'
  off
}

cmd=
rw=0
probe=0
fw=0
set -f  # no globbing of cmdline words
for a in $(cat /proc/cmdline); do
  case "$a" in
    strata.cmd=*) cmd=${a#strata.cmd=} ;;
    strata.rw=1) rw=1 ;;
    strata.probe=1) probe=1 ;;
    strata.cmdfw=1) fw=1 ;;
  esac
done
set +f
if [ "$probe" = 1 ]; then
  echo "STRATA-VM-BEGIN"
  printf '\nSTRATA-VM-END rc=0\n'
  off
fi
for m in $(cat /etc/modules.list); do
  insmod "/lib/modules/$m.ko" 2>/dev/null || echo "vm-init: insmod $m failed" >&2
done

if [ "$fw" = 1 ]; then
  f=/sys/firmware/qemu_fw_cfg/by_name/opt/strata/cmd/raw
  [ -r $f ] || fail "strata.cmdfw=1 but no $f"
  cmd=$(cat $f)
elif [ -n "$cmd" ]; then
  cmd=$(echo "$cmd" | base64 -d) || fail "strata.cmd is not valid base64"
else
  cmd=true
fi

i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  [ $i -gt 100 ] && fail "no /dev/vda after 10 s"
  sleep 0.1
done

mkdir -p /newroot
if [ "$rw" = 1 ]; then
  mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda (ext4, rw)"
else
  # A read-only disk cannot replay a journal: retry without it.
  err=$(mount -t ext4 -o ro /dev/vda /newroot 2>&1) ||
    { echo "vm-init: $err; retrying with noload" >&2
      mount -t ext4 -o ro,noload /dev/vda /newroot; } ||
    fail "cannot mount /dev/vda (ext4, ro)"
fi
for d in proc sys dev; do
  [ -d "/newroot/$d" ] || continue
  case $d in
    proc) mount -t proc proc /newroot/proc ;;
    sys) mount -t sysfs sys /newroot/sys ;;
    dev) mount -t devtmpfs dev /newroot/dev ;;
  esac
done

echo "STRATA-VM-BEGIN"
env -i HOME=/root TERM=linux PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  chroot /newroot /bin/sh -c "$cmd" </dev/null
rc=$?
# The output may not end in a newline: the marker always starts a new line
# (boot.py drops exactly that "\n").
printf '\nSTRATA-VM-END rc=%d\n' "$rc"

# Clean shutdown: stop what the command left running, unmount innermost first.
kill -9 -1 2>/dev/null
sleep 0.1
cd /
sync
for m in $(awk '$2 ~ "^/newroot/" {print $2}' /proc/mounts | sort -r); do
  umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
done
if ! umount /newroot 2>/dev/null; then
  mount -o remount,ro /newroot 2>/dev/null ||
    echo "STRATA-VM-WARN /newroot could not be unmounted or remounted read-only"
fi
off
