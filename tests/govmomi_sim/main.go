// A second, independent vCenter simulator for the VMware driver's tests: govmomi's own
// simulator library (Debian's golang-github-vmware-govmomi-dev 0.24.2) behind this small
// main, on 127.0.0.1. It is someone else's reading of the vSphere API, next to
// tests/vsphere_sim (ours); tests/integration/test_vmware_govmomi.py drives the driver's
// real calls against it.
//
// Built offline (tests/govmomi_sim/control.py does it, once per checkout):
//
//	GOPATH=<dir>:/usr/share/gocode GO111MODULE=off GOPROXY=off go build -o <bin> .
//
// Usage: govmomi_sim --port P --user U --password-file F [--session-idle-timeout D]; prints
// "ready <port>" and serves until SIGTERM.
//
// The model is simulator.VPX() (datacenter DC0, one cluster of one host) with two local
// datastores, LocalDS_0 and LocalDS_1 (a VM's disks may sit on either), without VMs: the tests create theirs with CreateVM_Task. The simulator's known
// defects are worked around here, each where it is handled below, and listed in the
// README's VMware section. Nothing is bent in the driver for them.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/signal"
	"path"
	"regexp"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

var (
	thisRe     = regexp.MustCompile(`<_this[^>]*type="VirtualMachine"[^>]*>([^<]+)</_this>`)
	snapshotRe = regexp.MustCompile(`<_this[^>]*type="VirtualMachineSnapshot"[^>]*>([^<]+)</_this>`)
	taskRe     = regexp.MustCompile(`<returnval[^>]*type="Task"[^>]*>([^<]+)</returnval>`)
)

// emptyFetch is the answer to a property read whose value is unset: no returnval, which
// pyVmomi reads as None (the vSphere API leaves unset properties out).
const emptyFetch = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/"` +
	` xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"` +
	` xmlns:xsd="http://www.w3.org/2001/XMLSchema"` +
	` xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">` +
	`<soapenv:Body><FetchResponse xmlns="urn:vim25"></FetchResponse></soapenv:Body>` +
	`</soapenv:Envelope>`

func main() {
	port := flag.Int("port", 0, "TCP port on 127.0.0.1 (0: any free port)")
	user := flag.String("user", "administrator@vsphere.local", "the only login accepted")
	passwordFile := flag.String("password-file", "", "file holding its password")
	idle := flag.Duration("session-idle-timeout", 0, "end a session this long after its last SOAP call (0: never)")
	flag.Parse()
	// The simulator's own knob: a session expires SessionIdleTimeout after its
	// LastActiveTime, which each /sdk request sets (simulator/session_manager.go,
	// expiredSession, SetSession); /folder requests carry no session here.
	simulator.SessionIdleTimeout = *idle
	password := "pass"
	if *passwordFile != "" {
		data, err := os.ReadFile(*passwordFile)
		if err != nil {
			log.Fatal(err)
		}
		password = strings.TrimSpace(string(data))
	}

	model := simulator.VPX()
	model.Machine = 0
	model.ClusterHost = 1
	model.Datastore = 2
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	// Workaround: the local datastore reports summary.type "OTHER"; an ESXi host's local
	// datastore is VMFS (DatastoreSummary.type), which is what the driver checks for.
	for _, obj := range simulator.Map.All("Datastore") {
		obj.(*simulator.Datastore).Summary.Type = "VMFS"
	}
	// Only this login is accepted (SessionManager.validLogin compares with Listen.User).
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(*user, password)}
	inner := model.Service.NewServer() // the simulator's own listener, on another port
	defer inner.Close()

	listener, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("ready %d\n", listener.Addr().(*net.TCPAddr).Port)
	_ = os.Stdout.Sync()

	done := make(chan os.Signal, 1)
	signal.Notify(done, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		_ = http.Serve(listener, workarounds(model.Service.ServeMux))
	}()
	<-done
	model.Remove() // the datastore's temporary directory
}

// workarounds wraps the simulator's handler for what its 0.24.2 release gets wrong.
func workarounds(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/sdk" || r.Method != http.MethodPost {
			next.ServeHTTP(w, r) // /folder and the rest stream as they are
			return
		}
		body, err := io.ReadAll(r.Body)
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		var restore func()
		if bytes.Contains(body, []byte("<CloneVM_Task")) {
			restore = protectCloneSource(body)
		}
		snapshotVM := snapshotOwner(body)
		rec := httptest.NewRecorder()
		panicked := serve(next, rec, r)
		if restore != nil {
			restore()
		}
		if snapshotVM != nil {
			entityIsTheVM(rec.Body.Bytes(), snapshotVM)
		}
		if bytes.Contains(body, []byte("<DeleteDatastoreFile_Task")) {
			noEntity(rec.Body.Bytes())
		}
		switch {
		case panicked && bytes.Contains(body, []byte("<Fetch")):
			// Defect 1: reading an unset property (vm.snapshot of a VM without
			// snapshots) panics in the simulator's Fetch (index out of range) and drops
			// the connection. Answer as vSphere does: no value.
			w.Header().Set("Content-Type", "text/xml; charset=utf-8")
			_, _ = io.WriteString(w, emptyFetch)
		case panicked:
			w.WriteHeader(http.StatusInternalServerError)
		default:
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			_, _ = w.Write(rec.Body.Bytes())
		}
	})
}

// snapshotOwner: the VM of the snapshot a RevertToSnapshot_Task or RemoveSnapshot_Task
// names (read before the call: a removed snapshot is gone after it).
func snapshotOwner(body []byte) *simulator.VirtualMachine {
	m := snapshotRe.FindSubmatch(body)
	if m == nil {
		return nil
	}
	ref := types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: string(m[1])}
	snap, ok := simulator.Map.Get(ref).(*simulator.VirtualMachineSnapshot)
	if !ok {
		return nil
	}
	vm, _ := simulator.Map.Get(snap.Vm).(*simulator.VirtualMachine)
	return vm
}

// entityIsTheVM works around defect 2: snapshot tasks report the snapshot as their
// entity, which is not a ManagedEntity (TaskInfo.entity), so pyVmomi refuses to read
// task.info. vSphere reports the VM.
func entityIsTheVM(response []byte, vm *simulator.VirtualMachine) {
	m := taskRe.FindSubmatch(response)
	if m == nil {
		return
	}
	ref := types.ManagedObjectReference{Type: "Task", Value: string(m[1])}
	if task, ok := simulator.Map.Get(ref).(*simulator.Task); ok {
		simulator.Map.WithLock(task, func() {
			self := vm.Self
			task.Info.Entity = &self
			task.Info.EntityName = vm.Name
		})
	}
}

// noEntity works around defect 8: FileManager tasks report the FileManager as their
// entity, which is not a ManagedEntity (TaskInfo.entity), so pyVmomi refuses to read
// task.info. The entity is left unset instead ("Managed entity to which the operation
// applies", optional).
func noEntity(response []byte) {
	m := taskRe.FindSubmatch(response)
	if m == nil {
		return
	}
	ref := types.ManagedObjectReference{Type: "Task", Value: string(m[1])}
	if task, ok := simulator.Map.Get(ref).(*simulator.Task); ok {
		simulator.Map.WithLock(task, func() {
			task.Info.Entity = nil
			task.Info.EntityName = ""
		})
	}
}

// serve runs the simulator's handler; a panic is reported instead of killing the
// connection (the simulator's locks are released by its own defers).
func serve(next http.Handler, w http.ResponseWriter, r *http.Request) (panicked bool) {
	defer func() {
		if v := recover(); v != nil {
			log.Printf("simulator panic on %s: %v", r.URL.Path, v)
			panicked = true
		}
	}()
	next.ServeHTTP(w, r)
	return false
}

// protectCloneSource works around two clone defects; it returns what to do once the
// (synchronous) CloneVM_Task has run.
//
// Defect 3: CloneVM_Task edits the source VM's own disk devices for the clone (it blanks
// their file names and parents, and CreateVM then points them at the clone's files), so
// the source VM ends up on the clone's disks. The source is given copies of its devices
// to be edited, and gets its own back afterwards.
//
// Defect 4: clones copy no bytes (the clone's disk files are created empty). After the
// clone, each disk's flat file is copied from the source's, as a full clone does. The
// simulator keeps no snapshot bytes, so this is the source's current content: the tests
// do not write between the take's snapshot and its clone.
//
// Not worked around: a disk that the clone spec's config.deviceChange removes still gets
// its files made in the clone's folder (CloneVMTask, simulator/virtual_machine.go, creates
// a file for every source disk, then applies spec.Config.DeviceChange to the clone, whose
// removal only detaches the device). Whether vCenter does the same is not documented; the
// tests see what the driver leaves behind either way.
func protectCloneSource(body []byte) func() {
	m := thisRe.FindSubmatch(body)
	if m == nil {
		return nil
	}
	ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: string(m[1])}
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok {
		return nil
	}
	var original []types.BaseVirtualDevice
	sources := map[int32]string{}
	simulator.Map.WithLock(vm, func() {
		original = vm.Config.Hardware.Device
		copies := make([]types.BaseVirtualDevice, len(original))
		for i, d := range original {
			copies[i] = d
			if disk, isDisk := d.(*types.VirtualDisk); isDisk {
				c := *disk
				if b, flat := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); flat {
					bc := *b
					c.Backing = &bc
					sources[disk.Key] = b.FileName
				}
				copies[i] = &c
			}
		}
		vm.Config.Hardware.Device = copies
	})
	before := map[string]bool{}
	for _, obj := range simulator.Map.All("VirtualMachine") {
		before[obj.Reference().Value] = true
	}
	return func() {
		simulator.Map.WithLock(vm, func() { vm.Config.Hardware.Device = original })
		for _, obj := range simulator.Map.All("VirtualMachine") {
			if before[obj.Reference().Value] {
				continue
			}
			clone := obj.(*simulator.VirtualMachine)
			for _, d := range clone.Config.Hardware.Device {
				disk, isDisk := d.(*types.VirtualDisk)
				if !isDisk {
					continue
				}
				b, flat := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
				if src, known := sources[disk.Key]; flat && known {
					if err := copyFlat(src, b.FileName); err != nil {
						log.Printf("clone %s: copying %s: %v", clone.Name, src, err)
					}
				}
			}
		}
	}
}

// copyFlat copies "<from>-flat.vmdk" over "<to>-flat.vmdk" (datastore paths).
func copyFlat(from, to string) error {
	src, err := localFlat(from)
	if err != nil {
		return err
	}
	dst, err := localFlat(to)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, data, 0o600)
}

func localFlat(dsPath string) (string, error) {
	var p object.DatastorePath
	if !p.FromString(dsPath) {
		return "", fmt.Errorf("not a datastore path: %q", dsPath)
	}
	for _, obj := range simulator.Map.All("Datastore") {
		ds := obj.(*simulator.Datastore)
		if ds.Name == p.Datastore {
			flat := strings.TrimSuffix(p.Path, ".vmdk") + "-flat.vmdk"
			return path.Join(ds.Info.GetDatastoreInfo().Url, flat), nil
		}
	}
	return "", fmt.Errorf("no datastore %q", p.Datastore)
}
